import Auth
import Foundation
import GRPC
import SwiftProtobuf
import VigilCore

/// Who may call a method while auth is enabled.
public enum Access<Req> {
    /// Anyone, with or without a token (Authenticate, MemberList).
    case open
    /// Any user with a valid token.
    case authenticated
    /// Users holding the root role.
    case admin
    /// Users whose roles grant the keys the request touches (root skips the check).
    case keys((Caller, Req) throws(EtcdError) -> Void)
    /// Like `keys`, for requests that need it (for the others: `open`).
    case when((Req) -> Bool, (Caller, Req) throws(EtcdError) -> Void)
}

/// Who sent a request: its auth token, or the Common Name of its verified TLS client certificate.
public struct Credentials: Sendable {
    public var token: String?
    public var commonName: String?
    public init(token: String?, commonName: String? = nil) {
        self.token = token
        self.commonName = commonName
    }
}

/// What a request carries besides its message.
public struct RequestInfo: Sendable {
    /// The auth token (gRPC `token` metadata, or the gateway's `Authorization` header).
    public var token: String?
    /// The Common Name of a verified TLS client certificate (gRPC only: etcd ignores it on the
    /// gateway), the user when no token is given.
    public var commonName: String?
    /// The request's size as gRPC would carry it (for `--max-request-bytes`).
    public var size: Int
    public init(token: String?, commonName: String? = nil, size: Int) {
        self.token = token
        self.commonName = commonName
        self.size = size
    }

    public var credentials: Credentials { Credentials(token: token, commonName: commonName) }
}

/// Where a unary method's one answer goes: a gRPC call, or the gateway's JSON response.
public protocol ReplySink: AnyObject {
    func ok(_ response: any SwiftProtobuf.Message)
    func fail(_ error: EtcdError)
    /// Runs `body` if the caller goes away before the answer (a cancelled or timed-out call).
    func whenAbandoned(_ body: @escaping () -> Void)
}

extension ReplySink {
    public func whenAbandoned(_ body: @escaping () -> Void) {}
}

/// Answers a unary request once, with a response or an error, whatever carried the request.
public struct Reply<Resp: SwiftProtobuf.Message> {
    let sink: any ReplySink
    public init(_ sink: any ReplySink) { self.sink = sink }
    public func ok(_ resp: Resp) { sink.ok(resp) }
    public func fail(_ e: EtcdError) { sink.fail(e) }
    /// Runs `body` if the caller goes away before the answer (a waiting Lock gives up its place).
    public func whenAbandoned(_ body: @escaping () -> Void) { sink.whenAbandoned(body) }
}

/// A unary method's handler, independent of how the request arrived (binary protobuf over gRPC,
/// JSON over the gateway): the transports decode `requestType`, then call `serve`.
public final class UnaryMethod {
    public let method: EtcdMethod
    public let requestType: any SwiftProtobuf.Message.Type
    public let responseType: any SwiftProtobuf.Message.Type
    let body: (_ request: any SwiftProtobuf.Message, _ info: RequestInfo, _ reply: any ReplySink) -> Void
    /// Name fields that may hold bytes that are not UTF-8 (Auth methods; see `RawNames`).
    var rawNames: (request: Set<Int>, response: Set<Int>)?

    init(
        method: EtcdMethod, requestType: any SwiftProtobuf.Message.Type,
        responseType: any SwiftProtobuf.Message.Type,
        body: @escaping (any SwiftProtobuf.Message, RequestInfo, any ReplySink) -> Void
    ) {
        self.method = method
        self.requestType = requestType
        self.responseType = responseType
        self.body = body
    }

    /// Runs the method on a decoded request (of `requestType`); answers through `reply` once.
    public func serve(_ request: any SwiftProtobuf.Message, _ info: RequestInfo, _ reply: any ReplySink) {
        body(request, info, reply)
    }
}

/// A unary method over gRPC: the first message is the request (more are ignored, as one request
/// is all a unary call carries); a half-close before it is an error.
final class UnaryCall: CallHandler, ReplySink {
    private let method: UnaryMethod
    private var seen = false

    init(_ method: UnaryMethod) { self.method = method }

    func call(_ call: ServerCall, received message: [UInt8]) {
        guard !seen else { return }
        seen = true
        let req: any SwiftProtobuf.Message
        do { req = try method.requestType.init(serializedBytes: message) } catch {
            // A name that is not UTF-8 (etcd takes names as bytes) decodes once escaped.
            if case .invalidUTF8? = error as? BinaryDecodingError,
                let escaped = RawNames.escapeRequest(message, method.rawNames?.request ?? []),
                let again = try? method.requestType.init(serializedBytes: escaped)
            {
                self.call = call
                method.serve(
                    again, RequestInfo(token: call.token, commonName: call.peerCommonName, size: message.count), self)
                return
            }
            call.finish(EtcdError.malformedRequest.with(message: "grpc: error unmarshalling request: \(error)").status)
            return
        }
        self.call = call
        method.serve(req, RequestInfo(token: call.token, commonName: call.peerCommonName, size: message.count), self)
    }

    func callHalfClosed(_ call: ServerCall) {
        if !seen { call.finish(EtcdError.missingRequest.status) }
    }

    func callEnded(_ call: ServerCall) {
        self.call = nil
        if !answered, let a = abandoned {
            abandoned = nil
            a()
        }
    }

    private var answered = false
    private var abandoned: (() -> Void)?

    func whenAbandoned(_ body: @escaping () -> Void) { abandoned = body }

    /// Set while the method runs (an answer may come after a commit).
    private var call: ServerCall?

    func ok(_ response: any SwiftProtobuf.Message) {
        answered = true
        guard let call else { return }
        do {
            if let raw = method.rawNames?.response, !raw.isEmpty {
                let bytes: [UInt8] = try response.serializedBytes()
                call.send(RawNames.unescapeResponse(bytes, raw))
            } else {
                try call.send(response)
            }
            call.finish(.ok)
        } catch {
            call.finish(EtcdError.internal("grpc: error while marshaling: \(error)").status)
        }
    }

    func fail(_ error: EtcdError) {
        answered = true
        call?.finish(error.status)
    }
}

extension ServerCall {
    /// The auth token of a gRPC call (`token` metadata, or `authorization` as the gateway sends it).
    var token: String? { metadata("token") ?? metadata("authorization") }
    /// Who sent the call: its token, or its TLS client certificate's Common Name.
    public var credentials: Credentials { Credentials(token: token, commonName: peerCommonName) }
}
