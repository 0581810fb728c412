/// gRPC's canonical status codes (grpc/doc/statuscodes.md). They are shared vocabulary: the gRPC
/// layer sends them in `grpc-status`, etcd's error table is written in them, and the JSON gateway
/// turns them into HTTP statuses.
public enum GRPCCode: Int, Sendable, CaseIterable {
    case ok = 0
    case cancelled, unknown, invalidArgument, deadlineExceeded, notFound, alreadyExists,
        permissionDenied, resourceExhausted, failedPrecondition, aborted, outOfRange, unimplemented,
        `internal`, unavailable, dataLoss, unauthenticated

    /// The name Go's `codes.Code.String()` gives (as go-grpc-prometheus labels `grpc_code`).
    public var name: String {
        switch self {
        case .ok: "OK"
        case .cancelled: "Canceled"
        case .unknown: "Unknown"
        case .invalidArgument: "InvalidArgument"
        case .deadlineExceeded: "DeadlineExceeded"
        case .notFound: "NotFound"
        case .alreadyExists: "AlreadyExists"
        case .permissionDenied: "PermissionDenied"
        case .resourceExhausted: "ResourceExhausted"
        case .failedPrecondition: "FailedPrecondition"
        case .aborted: "Aborted"
        case .outOfRange: "OutOfRange"
        case .unimplemented: "Unimplemented"
        case .internal: "Internal"
        case .unavailable: "Unavailable"
        case .dataLoss: "DataLoss"
        case .unauthenticated: "Unauthenticated"
        }
    }

    /// The HTTP status grpc-gateway (v1, as etcd 3.4 serves it) answers for this code.
    public var httpStatus: Int {
        switch self {
        case .ok: 200
        case .cancelled: 408
        case .invalidArgument, .failedPrecondition, .outOfRange: 400
        case .deadlineExceeded: 504
        case .notFound: 404
        case .alreadyExists, .aborted: 409
        case .permissionDenied: 403
        case .unauthenticated: 401
        case .resourceExhausted: 429
        case .unimplemented: 501
        case .unavailable: 503
        case .unknown, .internal, .dataLoss: 500
        }
    }
}
