/// An error as etcd's clients see it: a message, a gRPC code and, over the JSON gateway, an HTTP
/// status. Clients match etcd's errors by their text (Go's `rpctypes.Error` looks the message up
/// in a map), so every message in the table below is byte-identical to etcd's `rpctypes`, or to
/// the `cancel_reason` strings of etcd's watch.
///
/// This file is the one place that holds them: the services throw these values, the gRPC layer
/// sends `code.grpcCode` and `message`, the gateway answers `code.httpStatus`, and the metrics count
/// the ones whose `code.refusal` is set.
public struct EtcdError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of error it is: one row of the table.
    public struct Code: Hashable, Sendable {
        /// etcd's text for it.
        public let message: String
        public let grpcCode: GRPCCode
        /// The HTTP status over the gateway: grpc-gateway's mapping of the gRPC code, except for
        /// the HTTP layer's own refusals (413, 408).
        public let httpStatus: Int
        /// Set for the refusals of a limit, counted in `vigil_requests_refused_total`.
        public let refusal: Refusal?
    }

    /// Why a request was refused for a limit (the `reason` label of `vigil_requests_refused_total`).
    public enum Refusal: String, Sendable, CaseIterable {
        case requestTooLarge = "request_too_large"
        case tooManyTxnOps = "too_many_txn_ops"
        case tooManyStreams = "too_many_streams"
        case noSpace = "no_space"
        case tooManyRequests = "too_many_requests"
        case httpReadTimeout = "http_read_timeout"
        /// TLS: a handshake that failed (garbage, no shared cipher or version, a bad message).
        case tlsHandshake = "tls_handshake"
        /// TLS: a client certificate that did not verify (expired, self-signed, wrong CA, revoked).
        case tlsBadCertificate = "tls_bad_certificate"
        /// TLS: plaintext HTTP or h2c sent to a TLS listener.
        case tlsPlaintext = "tls_plaintext"
        /// TLS: a ClientHello sent to a plaintext listener.
        case tlsOnPlainPort = "tls_on_plain_port"
        /// TLS: a handshake that did not finish in time.
        case tlsHandshakeTimeout = "tls_handshake_timeout"
        /// TLS: a client that tried to renegotiate.
        case tlsRenegotiation = "tls_renegotiation"
    }

    public let code: Code
    /// The text sent: the code's message, or for the few errors etcd words case by case, that.
    public let message: String

    public var description: String { message }
    public var grpcCode: GRPCCode { code.grpcCode }

    init(_ grpcCode: GRPCCode, _ message: String, http: Int? = nil, refusal: Refusal? = nil) {
        code = Code(message: message, grpcCode: grpcCode, httpStatus: http ?? grpcCode.httpStatus, refusal: refusal)
        self.message = message
    }

    /// The same kind of error worded for this case (e.g. `etcdserver: defragment failed: …`).
    public func with(message: String) -> EtcdError { EtcdError(code: code, message: message) }

    private init(code: Code, message: String) {
        self.code = code
        self.message = message
    }

    /// An error another etcd server answered, passed on as it came (a mirror's forwarded calls).
    public static func relayed(_ code: GRPCCode, _ message: String) -> EtcdError { EtcdError(code, message) }

    /// The error as etcd's Lock and Election servers pass on what their inner client got: the same
    /// text with gRPC code Unknown (HTTP 500), because the client's error type carries no gRPC
    /// status (e.g. `etcdserver: requested lease not found` for a Lock with an unknown lease).
    public var passedOnByClient: EtcdError {
        code.grpcCode == .unknown ? self : EtcdError(.unknown, message)
    }

    /// An internal failure with its own words (gRPC INTERNAL, HTTP 500).
    public static func `internal`(_ message: String) -> EtcdError { EtcdError(.internal, message) }
}

// MARK: - The table (etcd's api/v3rpc/rpctypes, same text in 3.4 and 3.5)

extension EtcdError {
    // Request validation.
    public static let emptyKey = EtcdError(.invalidArgument, "etcdserver: key is not provided")
    public static let keyNotFound = EtcdError(.invalidArgument, "etcdserver: key not found")
    public static let valueProvided = EtcdError(.invalidArgument, "etcdserver: value is provided")
    public static let leaseProvided = EtcdError(.invalidArgument, "etcdserver: lease is provided")
    public static let tooManyOps = EtcdError(
        .invalidArgument, "etcdserver: too many operations in txn request", refusal: .tooManyTxnOps)
    public static let duplicateKey = EtcdError(.invalidArgument, "etcdserver: duplicate key given in txn request")
    public static let requestTooLarge = EtcdError(
        .invalidArgument, "etcdserver: request is too large", refusal: .requestTooLarge)
    public static let tooManyRequests = EtcdError(
        .resourceExhausted, "etcdserver: too many requests", refusal: .tooManyRequests)

    // History.
    public static let compacted = EtcdError(.outOfRange, "etcdserver: mvcc: required revision has been compacted")
    /// etcd 3.7's RangeStream reads in key order only, and without revision filters.
    public static let rangeStreamSort = EtcdError(.unimplemented, "RangeStream does not support custom sort orders")
    public static let rangeStreamFilters = EtcdError(
        .unimplemented, "RangeStream does not support revision filters")
    public static let futureRevision = EtcdError(
        .outOfRange, "etcdserver: mvcc: required revision is a future revision")
    public static let noSpace = EtcdError(
        .resourceExhausted, "etcdserver: mvcc: database space exceeded", refusal: .noSpace)

    // Leases.
    public static let leaseNotFound = EtcdError(.notFound, "etcdserver: requested lease not found")
    public static let leaseExist = EtcdError(.failedPrecondition, "etcdserver: lease already exists")
    public static let leaseTTLTooLarge = EtcdError(.outOfRange, "etcdserver: too large lease TTL")

    // Watch: `cancel_reason` texts of a refused create (etcd's mvcc words; sent in a response, not a status).
    public static let watcherRangeEmpty = EtcdError(.invalidArgument, "mvcc: watcher range is empty")
    public static let duplicateWatchID = EtcdError(
        .invalidArgument, "mvcc: duplicate watch ID provided on the WatchStream")
    /// Not an etcd error: the hub keeps watched keys in a byte arena of at most 4 GiB.
    public static let watchedKeysFull = EtcdError(
        .resourceExhausted, "etcdserver: too many requests (the watched keys fill 4 GiB)", refusal: .tooManyRequests)

    // Cluster.
    public static let memberNotEnoughStarted = EtcdError(
        .failedPrecondition, "etcdserver: re-configuration failed due to not enough started members")
    public static let memberNotFound = EtcdError(.notFound, "etcdserver: member not found")
    public static let memberNotLearner = EtcdError(.failedPrecondition, "etcdserver: can only promote a learner member")
    /// Not an etcd error: a one-member Vigil has no peers to change.
    public static let membershipFixed = EtcdError(
        .failedPrecondition, "etcdserver: membership of a single-member vigil cluster cannot change")
    /// Not an etcd error (etcdctl checks URLs before sending): a MemberUpdate with a peer URL
    /// that is not scheme://host:port.
    public static let invalidPeerURL = EtcdError(.invalidArgument, "etcdserver: invalid peer URL")
    public static let badLeaderTransferee = EtcdError(.failedPrecondition, "etcdserver: bad leader transferee")

    // Auth.
    public static let rootUserNotExist = EtcdError(.failedPrecondition, "etcdserver: root user does not exist")
    public static let rootRoleNotExist = EtcdError(.failedPrecondition, "etcdserver: root user does not have root role")
    public static let userAlreadyExist = EtcdError(.failedPrecondition, "etcdserver: user name already exists")
    public static let userEmpty = EtcdError(.invalidArgument, "etcdserver: user name is empty")
    public static let userNotFound = EtcdError(.failedPrecondition, "etcdserver: user name not found")
    public static let roleAlreadyExist = EtcdError(.failedPrecondition, "etcdserver: role name already exists")
    public static let roleNotFound = EtcdError(.failedPrecondition, "etcdserver: role name not found")
    public static let roleEmpty = EtcdError(.invalidArgument, "etcdserver: role name is empty")
    public static let authFailed = EtcdError(
        .invalidArgument, "etcdserver: authentication failed, invalid user ID or password")
    public static let permissionDenied = EtcdError(.permissionDenied, "etcdserver: permission denied")
    public static let authNotEnabled = EtcdError(.failedPrecondition, "etcdserver: authentication is not enabled")
    public static let invalidAuthToken = EtcdError(.unauthenticated, "etcdserver: invalid auth token")
    /// A JWT signed before the last change of users, roles or permissions (clients authenticate again).
    public static let authOldRevision = EtcdError(.invalidArgument, "etcdserver: revision of auth store is old")
    public static let permissionNotGiven = EtcdError(.invalidArgument, "etcdserver: permission not given")
    public static let roleNotGranted = EtcdError(.failedPrecondition, "etcdserver: role is not granted to the user")
    public static let permissionNotGranted = EtcdError(
        .failedPrecondition, "etcdserver: permission is not granted to the role")
    public static let invalidAuthMgmt = EtcdError(.invalidArgument, "etcdserver: invalid auth management")
    /// Not an etcd error: bcrypt reads 72 bytes at most and no NUL, so longer passwords are refused
    /// rather than silently cut.
    public static let passwordUnusable = EtcdError(
        .invalidArgument, "etcdserver: password must be at most 72 bytes and hold no NUL byte")

    // Lock and Election: plain errors in etcd, so gRPC's Unknown.
    public static let missingLeaderKey = EtcdError(.unknown, #""leader" field must be provided"#)
    public static let electionNotLeader = EtcdError(.unknown, "election: not leader")
    public static let electionNoLeader = EtcdError(.unknown, "election: no leader")
    /// The lease of a waiting Lock or Campaign ended before it got its turn.
    public static let sessionExpired = EtcdError(.unknown, "session expired")

    // Server state.
    public static let notCapable = EtcdError(.unavailable, "etcdserver: not capable")
    public static let stopped = EtcdError(.unavailable, "etcdserver: server stopped")
    public static let timeout = EtcdError(.unavailable, "etcdserver: request timed out")
    public static let corrupt = EtcdError(.dataLoss, "etcdserver: corrupt cluster")

    // The gRPC layer's own words (grpc-go's), for requests that never reach a service.
    public static let malformedRequest = EtcdError(.internal, "grpc: error unmarshalling request")
    /// A unary call half-closed without its request message.
    public static let missingRequest = EtcdError(.internal, "grpc: error while receiving the request: unexpected EOF")
    public static let deadlineExceeded = EtcdError(.deadlineExceeded, "context deadline exceeded")
    /// A request body over the gateway's limit, refused before it is read whole (HTTP 413).
    public static let bodyTooLarge = EtcdError(
        .invalidArgument, "etcdserver: request is too large", http: 413, refusal: .requestTooLarge)
    /// An HTTP/1.1 request that did not arrive in full within `--http-read-timeout` (HTTP 408).
    public static let readTimeout = EtcdError(
        .deadlineExceeded, "request timed out", http: 408, refusal: .httpReadTimeout)
    /// An HTTP/1.1 request http-parser could not read (HTTP 400).
    public static let malformedHTTP = EtcdError(.invalidArgument, "malformed HTTP request")
    /// HTTP/2 streams past `--max-concurrent-streams` (refused with REFUSED_STREAM).
    public static let tooManyStreams = EtcdError(
        .resourceExhausted, "too many concurrent streams", refusal: .tooManyStreams)
}
