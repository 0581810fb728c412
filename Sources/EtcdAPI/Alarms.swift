import EtcdProto
import MVCC

/// The active alarms (NOSPACE, CORRUPT), persisted as meta entries `alarm/<TYPE>` → member ID in
/// the same group commits as the data, so that an alarm survives restart.
public final class Alarms {
    private let store: KVStore
    private let memberID: UInt64
    public private(set) var active: [Etcdserverpb_AlarmMember] = []

    /// - Parameter restoring: the backend's meta entries: the alarms a previous run left active.
    init(store: KVStore, memberID: UInt64, restoring meta: [String: Int64]) {
        self.store = store
        self.memberID = memberID
        for t in [Etcdserverpb_AlarmType.nospace, .corrupt] {
            if let m = meta[Self.name(t)] {
                var a = Etcdserverpb_AlarmMember()
                a.memberID = UInt64(bitPattern: m)
                a.alarm = t
                active.append(a)
            }
        }
    }

    static func name(_ t: Etcdserverpb_AlarmType) -> String { "alarm/\(t)" }

    public func isActive(_ t: Etcdserverpb_AlarmType) -> Bool { active.contains { $0.alarm == t } }

    /// Raises an alarm (once); returns it.
    @discardableResult
    public func activate(_ t: Etcdserverpb_AlarmType, member: UInt64? = nil) -> Etcdserverpb_AlarmMember {
        if let a = active.first(where: { $0.alarm == t }) { return a }
        var a = Etcdserverpb_AlarmMember()
        a.memberID = member ?? memberID
        a.alarm = t
        active.append(a)
        store.setMeta(Self.name(t), Int64(bitPattern: a.memberID))
        return a
    }

    /// Clears an alarm; returns it if it was active.
    public func deactivate(_ t: Etcdserverpb_AlarmType) -> Etcdserverpb_AlarmMember? {
        guard let i = active.firstIndex(where: { $0.alarm == t }) else { return nil }
        let a = active.remove(at: i)
        store.removeMeta(Self.name(t))
        return a
    }

    /// Status's `errors`: each alarm in the text form etcd prints.
    var statusErrors: [String] {
        active.map { "memberID:\($0.memberID) alarm:\($0.alarm == .nospace ? "NOSPACE" : "CORRUPT") " }
    }
}
