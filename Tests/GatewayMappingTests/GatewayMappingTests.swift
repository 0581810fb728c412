import EtcdAPI
import EtcdProto
import Foundation
import HTTPCore
import MVCC
import SwiftProtobuf
import Testing
import VigilCore
import VigilTesting
import WatchHub

@testable import Gateway

/// Collects what the gateway answers.
final class Answer: HTTPResponder {
    var status = 0
    var body: [UInt8] = []
    var streaming = false
    var finished = false
    var observer: (any HTTPStreamObserver)?
    var queuedBytes: Int { 0 }
    var done = DoneCallbacks()

    func respond(_ response: HTTPResponse) {
        status = response.status
        body = response.body
        finished = true
        done.run(completed: true)
    }
    func whenDone(_ body: @escaping (Bool) -> Void) { done.add(body) }
    /// The client leaves.
    func leave() {
        observer?.responseClosed()
        done.run(completed: false)
    }
    func startStream(
        status: Int, contentType: String, headers: [(name: String, value: String)], observer: (any HTTPStreamObserver)?
    ) -> Bool {
        self.status = status
        streaming = true
        self.observer = observer
        return true
    }
    func send(_ chunk: [UInt8]) { body += chunk }
    func finish() {
        finished = true
        done.run(completed: true)
    }
    func notifyWhenDrained() { observer?.responseDrained() }

    var text: String { String(decoding: body, as: UTF8.self) }
    var json: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any] ?? [:] }
    var lines: [[String: Any]] {
        text.split(separator: "\n").compactMap {
            (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any]
        }
    }
}

private func b64(_ s: String) -> String { Data(s.utf8).base64EncodedString() }

/// The gateway over in-memory services: requests in, JSON out, no socket.
final class Harness {
    let memory = InMemoryServices()
    let gateway: Gateway

    init() { gateway = Gateway(services: memory.services) }

    func post(_ path: String, _ body: String, method: String = "POST", token: String? = nil) -> Answer {
        let a = Answer()
        var headers: [(name: String, value: String)] = []
        if let token { headers.append(("Authorization", token)) }
        gateway.handle(HTTPRequest(method: method, target: path, headers: headers, body: Array(body.utf8)), a)
        return a
    }
}

@Suite struct GatewayMappingTests {
    @Test func unaryRequestsAndAnswersUseEtcdsJSONShapes() throws {
        let h = Harness()
        let put = h.post("/v3/kv/put", #"{"key":"\#(b64("foo"))","value":"\#(b64("bar"))"}"#)
        #expect(put.status == 200)
        let header = try #require(put.json["header"] as? [String: Any])
        #expect(header["revision"] as? String == "2", "64-bit integers are strings")
        #expect(header["cluster_id"] as? String == "14841639068965178418", "proto field names, not camel case")
        let range = h.post("/v3beta/kv/range", #"{"key":"\#(b64("foo"))"}"#)
        let kv = try #require((range.json["kvs"] as? [[String: Any]])?.first)
        #expect(kv["value"] as? String == b64("bar") && kv["create_revision"] as? String == "2")
        #expect(range.json["count"] as? String == "1")
        #expect(kv["lease"] == nil, "defaults are left out")
    }

    @Test func errorsCarryTheTablesStatusCodeAndText() {
        let h = Harness()
        let empty = h.post("/v3/kv/range", "{}")
        #expect(empty.status == 400)
        #expect(
            empty.text
                == #"{"error":"etcdserver: key is not provided","message":"etcdserver: key is not provided","code":3}"#)
        let future = h.post("/v3/kv/range", #"{"key":"\#(b64("a"))","revision":"99"}"#)
        #expect(future.status == 400 && future.json["code"] as? Int == 11)
        let unknown = h.post("/v3/kv/nothing", "{}")
        #expect(unknown.status == 404 && unknown.text.contains(#""code":5"#))
        #expect(h.post("/v3/kv/range", "", method: "GET").status == 405)
        let garbage = h.post("/v3/kv/range", "{not json")
        #expect(garbage.status == 400 && garbage.json["code"] as? Int == 3)
        let noLease = h.post("/v3/lease/revoke", #"{"ID":"77"}"#)
        #expect(noLease.status == 404 && noLease.json["message"] as? String == "etcdserver: requested lease not found")
    }

    @Test func refusalsForALimitAreReported() {
        var refusals: [EtcdError.Refusal] = []
        let memory = InMemoryServices()
        let gateway = Gateway(services: memory.services, refused: { refusals.append($0) })
        let ops = (0..<200).map { i in #"{"request_put":{"key":"\#(b64("k\(i)"))"}}"# }.joined(separator: ",")
        let a = Answer()
        gateway.handle(
            HTTPRequest(method: "POST", target: "/v3/kv/txn", headers: [], body: Array(#"{"success":[\#(ops)]}"#.utf8)),
            a)
        #expect(a.status == 400 && a.text.contains("too many operations"))
        #expect(refusals == [.tooManyTxnOps])
    }

    @Test func aWatchStreamsJSONLinesUntilTheClientLeaves() throws {
        let h = Harness()
        let a = h.post(
            "/v3/watch", #"{"create_request":{"key":"\#(b64("w/"))","range_end":"\#(b64("w0"))","prev_kv":true}}"#)
        #expect(a.streaming && a.status == 200)
        _ = h.post("/v3/kv/put", #"{"key":"\#(b64("w/1"))","value":"\#(b64("a"))"}"#)
        _ = h.post("/v3/kv/put", #"{"key":"\#(b64("w/1"))","value":"\#(b64("b"))"}"#)
        let lines = a.lines.compactMap { $0["result"] as? [String: Any] }
        #expect(lines.count == 3)
        #expect(lines[0]["created"] as? Bool == true)
        let event = try #require((lines[2]["events"] as? [[String: Any]])?.first)
        #expect((event["kv"] as? [String: Any])?["value"] as? String == b64("b"))
        #expect((event["prev_kv"] as? [String: Any])?["value"] as? String == b64("a"))
        #expect(h.memory.services.watch.hub.watcherCount == 1)
        a.observer?.responseClosed()
        #expect(h.memory.services.watch.hub.watcherCount == 0, "the client leaving ends its watchers")
    }

    /// The JSON the hub makes for gateway streams is byte for byte what SwiftProtobuf makes of
    /// the same response as gRPC sends it.
    @Test func watchJSONEqualsSwiftProtobufsJSONOfTheGRPCResponse() throws {
        let identity = MemberIdentity(clusterID: 12, memberID: 34, name: "m", peerURLs: [], clientURLs: [])
        let grpc = GRPCWatchEncoder(identity: identity)
        let json = JSONWatchEncoder(identity: identity)
        var rng = SystemRandomNumberGenerator()
        for i in 0..<300 {
            var f = ResponseFields(
                headerRevision: Int64.random(in: 0...3, using: &rng) * 1000, watchID: Int64(i % 5) - 1)
            f.created = Bool.random(using: &rng)
            f.canceled = Bool.random(using: &rng)
            f.fragment = Bool.random(using: &rng)
            f.compactRevision = Bool.random(using: &rng) ? 7 : 0
            f.cancelReason = Bool.random(using: &rng) ? "" : "reason \"quoted\" \\ ünï\n"
            let prevKV = Bool.random(using: &rng)
            let events = (0..<Int.random(in: 0...3, using: &rng)).map { j in
                Event(
                    kind: j % 2 == 0 ? .put : .delete,
                    kv: KeyValue(
                        key: Array("k\(j)".utf8), createRevision: 2, modRevision: 5, version: 1, value: [0, 255, 7]),
                    prevKV: j == 0 ? KeyValue(key: Array("k0".utf8), modRevision: 3, value: [1]) : nil)
            }
            let framed = grpc.response(f, events: events.map { grpc.encode($0, prevKV: prevKV) })
            let decoded = try Etcdserverpb_WatchResponse(serializedBytes: Array(framed[5...]))
            let expected = "{\"result\":\(try decoded.jsonString(options: Gateway.jsonOptions))}\n"
            let made = json.response(f, events: events.map { json.encode($0, prevKV: prevKV) })
            #expect(String(decoding: made, as: UTF8.self) == expected)
        }
    }

    /// A client gone before its watch could start gets no watch session (nothing would end it).
    @Test func aWatchForAClientAlreadyGoneOpensNothing() {
        final class Gone: HTTPResponder {
            var queuedBytes: Int { 0 }
            func respond(_ response: HTTPResponse) {}
            func startStream(
                status: Int, contentType: String, headers: [(name: String, value: String)],
                observer: (any HTTPStreamObserver)?
            ) -> Bool { false }
            func send(_ chunk: [UInt8]) {}
            func finish() {}
            func notifyWhenDrained() {}
            func whenDone(_ body: @escaping (Bool) -> Void) { body(false) }
        }
        let h = Harness()
        let body = #"{"create_request":{"key":"\#(b64("w"))"}}"#
        h.gateway.handle(HTTPRequest(method: "POST", target: "/v3/watch", headers: [], body: Array(body.utf8)), Gone())
        #expect(h.memory.services.watch.hub.streamCount == 0 && h.memory.services.watch.hub.watcherCount == 0)
    }

    @Test func keepAliveAnswersEachRequestThenEnds() throws {
        let h = Harness()
        let grant = h.post("/v3/lease/grant", #"{"TTL":"30","ID":"5"}"#)
        #expect(grant.json["ID"] as? String == "5")
        let a = h.post("/v3/lease/keepalive", #"{"ID":"5"}{"ID":"6"}"#)
        let results = a.lines.compactMap { $0["result"] as? [String: Any] }
        #expect(results.map { $0["TTL"] as? String } == ["30", nil], "an unknown lease renews to 0")
        #expect(a.finished)
    }
}
