import GRPC
import MVCC

/// etcd's client-facing errors: one place holding each message and its gRPC code. Clients match
/// these by message text, so the text must stay byte-identical to etcd's `rpctypes`.
public struct EtcdError: Error, Equatable, CustomStringConvertible {
    public let code: GRPCCode
    public let message: String

    public init(_ code: GRPCCode, _ message: String) {
        self.code = code
        self.message = message
    }

    public var status: GRPCStatus { GRPCStatus(code, message) }
    public var description: String { message }

    public static let emptyKey = EtcdError(.invalidArgument, "etcdserver: key is not provided")
    public static let keyNotFound = EtcdError(.invalidArgument, "etcdserver: key not found")
    public static let valueProvided = EtcdError(.invalidArgument, "etcdserver: value is provided")
    public static let leaseProvided = EtcdError(.invalidArgument, "etcdserver: lease is provided")
    public static let tooManyOps = EtcdError(.invalidArgument, "etcdserver: too many operations in txn request")
    public static let duplicateKey = EtcdError(.invalidArgument, "etcdserver: duplicate key given in txn request")
    public static let compacted = EtcdError(.outOfRange, "etcdserver: mvcc: required revision has been compacted")
    public static let futureRevision = EtcdError(.outOfRange, "etcdserver: mvcc: required revision is a future revision")
    public static let noSpace = EtcdError(.resourceExhausted, "etcdserver: mvcc: database space exceeded")
    public static let leaseNotFound = EtcdError(.notFound, "etcdserver: requested lease not found")
    public static let leaseExist = EtcdError(.failedPrecondition, "etcdserver: lease already exists")
    public static let leaseTTLTooLarge = EtcdError(.outOfRange, "etcdserver: too large lease TTL")
    public static let watchCanceled = EtcdError(.cancelled, "etcdserver: watch canceled")
    public static let memberExist = EtcdError(.failedPrecondition, "etcdserver: member ID already exist")
    public static let peerURLExist = EtcdError(.failedPrecondition, "etcdserver: Peer URLs already exists")
    public static let memberNotEnoughStarted = EtcdError(.failedPrecondition,
                                                         "etcdserver: re-configuration failed due to not enough started members")
    public static let memberBadURLs = EtcdError(.invalidArgument, "etcdserver: given member URLs are invalid")
    public static let memberNotFound = EtcdError(.notFound, "etcdserver: member not found")
    public static let memberNotLearner = EtcdError(.failedPrecondition, "etcdserver: can only promote a learner member")
    public static let requestTooLarge = EtcdError(.invalidArgument, "etcdserver: request is too large")
    public static let tooManyRequests = EtcdError(.resourceExhausted, "etcdserver: too many requests")
    public static let rootUserNotExist = EtcdError(.failedPrecondition, "etcdserver: root user does not exist")
    public static let rootRoleNotExist = EtcdError(.failedPrecondition, "etcdserver: root user does not have root role")
    public static let userAlreadyExist = EtcdError(.failedPrecondition, "etcdserver: user name already exists")
    public static let userEmpty = EtcdError(.invalidArgument, "etcdserver: user name is empty")
    public static let userNotFound = EtcdError(.failedPrecondition, "etcdserver: user name not found")
    public static let roleAlreadyExist = EtcdError(.failedPrecondition, "etcdserver: role name already exists")
    public static let roleNotFound = EtcdError(.failedPrecondition, "etcdserver: role name not found")
    public static let roleEmpty = EtcdError(.invalidArgument, "etcdserver: role name is empty")
    public static let authFailed = EtcdError(.invalidArgument, "etcdserver: authentication failed, invalid user ID or password")
    public static let permissionDenied = EtcdError(.permissionDenied, "etcdserver: permission denied")
    public static let authNotEnabled = EtcdError(.failedPrecondition, "etcdserver: authentication is not enabled")
    public static let invalidAuthToken = EtcdError(.unauthenticated, "etcdserver: invalid auth token")
    public static let permissionNotGiven = EtcdError(.invalidArgument, "etcdserver: permission not given")
    public static let roleNotGranted = EtcdError(.failedPrecondition, "etcdserver: role is not granted to the user")
    public static let permissionNotGranted = EtcdError(.failedPrecondition, "etcdserver: permission is not granted to the role")
    public static let invalidAuthMgmt = EtcdError(.invalidArgument, "etcdserver: invalid auth management")
    public static let authOldRevision = EtcdError(.invalidArgument, "etcdserver: revision of auth store is old")
    /// Not an etcd error: bcrypt reads 72 bytes at most and no NUL, so longer passwords are refused
    /// rather than silently cut.
    public static let passwordUnusable = EtcdError(.invalidArgument,
                                                   "etcdserver: password must be at most 72 bytes and hold no NUL byte")
    public static let notCapable = EtcdError(.unavailable, "etcdserver: not capable")
    public static let stopped = EtcdError(.unavailable, "etcdserver: server stopped")
    public static let timeout = EtcdError(.unavailable, "etcdserver: request timed out")
    public static let corrupt = EtcdError(.dataLoss, "etcdserver: corrupt cluster")
    public static let badLeaderTransferee = EtcdError(.failedPrecondition, "etcdserver: bad leader transferee")

    /// The etcd error for a store error.
    public static func from(_ e: MVCCError) -> EtcdError {
        switch e {
        case .compacted: return .compacted
        case .futureRevision: return .futureRevision
        }
    }
}
