import EtcdProto
import Foundation
import MVCC
import VigilCore

public typealias RangeRequest = Etcdserverpb_RangeRequest
public typealias RangeResponse = Etcdserverpb_RangeResponse
public typealias PutRequest = Etcdserverpb_PutRequest
public typealias PutResponse = Etcdserverpb_PutResponse
public typealias DeleteRangeRequest = Etcdserverpb_DeleteRangeRequest
public typealias DeleteRangeResponse = Etcdserverpb_DeleteRangeResponse
public typealias TxnRequest = Etcdserverpb_TxnRequest
public typealias TxnResponse = Etcdserverpb_TxnResponse
public typealias RequestOp = Etcdserverpb_RequestOp
public typealias ResponseOp = Etcdserverpb_ResponseOp
public typealias Compare = Etcdserverpb_Compare

extension Data {
    /// The bytes, as the store's keys and values are.
    @inline(__always) public var bytes: Bytes { Bytes(self) }
}

extension KeyValue {
    /// As etcd's `mvccpb.KeyValue`.
    public var proto: Mvccpb_KeyValue {
        var p = Mvccpb_KeyValue()
        p.key = Data(key)
        p.createRevision = createRevision
        p.modRevision = modRevision
        p.version = version
        p.value = Data(value)
        p.lease = lease
        return p
    }
}

extension Event {
    /// As etcd's `mvccpb.Event`, with the previous key-value if asked for and known.
    public func proto(prevKV: Bool) -> Mvccpb_Event {
        var e = Mvccpb_Event()
        e.type = kind == .put ? .put : .delete
        e.kv = kv.proto
        if prevKV, let p = self.prevKV { e.prevKv = p.proto }
        return e
    }
}

/// The KV service's semantics (etcd's apply layer): validation, range post-processing,
/// transactions with compares, and compaction. Handlers are synchronous; the caller sends
/// responses once `ServerContext.commits` says the revision they observed is durable. Writes reach
/// watchers through the store (`StoreObserver`), not from here.
public final class KVService {
    let ctx: ServerContext
    var store: KVStore { ctx.store }
    private let leaseExists: (Int64) -> Bool

    /// - Parameter leaseExists: whether a lease is alive (the lessor's answer).
    init(context: ServerContext, leaseExists: @escaping (Int64) -> Bool) {
        ctx = context
        self.leaseExists = leaseExists
    }

    // MARK: Range

    /// A top-level Range: reads committed state only.
    public func range(_ r: RangeRequest) throws(EtcdError) -> RangeResponse {
        guard !r.key.isEmpty else { throw .emptyKey }
        let result: RangeResult
        do {
            result = try store.range(
                r.key.bytes, r.rangeEnd.bytes, revision: r.revision, limit: fetchLimit(r),
                countOnly: r.countOnly, keysOnly: r.keysOnly)
        } catch { throw EtcdError.from(error) }
        var resp = finishRange(r, result)
        resp.header = ctx.header(store.committedRevision)
        return resp
    }

    /// How many kvs to fetch: all when sorting or filtering (they change which come first).
    private func fetchLimit(_ r: RangeRequest) -> Int {
        if r.sortOrder != .none || r.sortTarget != .key || r.minModRevision != 0 || r.maxModRevision != 0
            || r.minCreateRevision != 0 || r.maxCreateRevision != 0
        {
            return 0
        }
        return r.limit > 0 ? Int(r.limit) + 1 : 0
    }

    /// Filters, sorts, limits and strips values as etcd does (count is never reduced).
    private func finishRange(_ r: RangeRequest, _ result: RangeResult) -> RangeResponse {
        var resp = RangeResponse()
        resp.count = Int64(result.count)
        if r.countOnly { return resp }
        var kvs = result.kvs
        if r.minModRevision != 0 { kvs.removeAll { $0.modRevision < r.minModRevision } }
        if r.maxModRevision != 0 { kvs.removeAll { $0.modRevision > r.maxModRevision } }
        if r.minCreateRevision != 0 { kvs.removeAll { $0.createRevision < r.minCreateRevision } }
        if r.maxCreateRevision != 0 { kvs.removeAll { $0.createRevision > r.maxCreateRevision } }

        var order = r.sortOrder
        if r.sortTarget != .key && order == .none { order = .ascend }
        if order != .none {
            // Ties keep key order in both directions (kvs arrive in key order), as etcd's sort of
            // a reversed comparison leaves them.
            let target = r.sortTarget
            func less(_ a: KeyValue, _ b: KeyValue) -> Bool {
                switch target {
                case .key: return compareBytes(a.key, b.key) < 0
                case .version: return a.version < b.version
                case .create: return a.createRevision < b.createRevision
                case .mod: return a.modRevision < b.modRevision
                case .value: return compareBytes(a.value, b.value) < 0
                case .UNRECOGNIZED: return false
                }
            }
            let indexed = kvs.enumerated().map { ($0.offset, $0.element) }
            let sorted = indexed.sorted { x, y in
                if less(x.1, y.1) { return order == .ascend }
                if less(y.1, x.1) { return order != .ascend }
                return x.0 < y.0
            }
            kvs = sorted.map { $0.1 }
        }
        if r.limit > 0 && kvs.count > Int(r.limit) {
            kvs.removeSubrange(Int(r.limit)...)
            resp.more = true
        }
        resp.kvs = kvs.map { kv in
            var p = kv.proto
            if r.keysOnly { p.value = Data() }
            return p
        }
        return resp
    }

    // MARK: Put / DeleteRange

    public func validatePut(_ r: PutRequest) throws(EtcdError) {
        guard !r.key.isEmpty else { throw .emptyKey }
        if r.ignoreValue && !r.value.isEmpty { throw .valueProvided }
        if r.ignoreLease && r.lease != 0 { throw .leaseProvided }
    }

    public func validateDelete(_ r: DeleteRangeRequest) throws(EtcdError) {
        guard !r.key.isEmpty else { throw .emptyKey }
    }

    /// Checks that a put can be applied against the state before the write (etcd's checkPut).
    private func checkPutApplicable(_ r: PutRequest, _ txn: WriteTxn) throws(EtcdError) {
        if r.ignoreValue || r.ignoreLease {
            if txn.get(r.key.bytes, withValue: false) == nil { throw .keyNotFound }
        }
        if r.lease != 0 && !leaseExists(r.lease) { throw .leaseNotFound }
    }

    private func applyPut(_ r: PutRequest, _ txn: WriteTxn) -> PutResponse {
        let key = r.key.bytes
        let cur = r.ignoreValue || r.ignoreLease ? txn.get(key, withValue: r.ignoreValue) : nil
        let value = r.ignoreValue ? (cur?.value ?? []) : r.value.bytes
        let lease = r.ignoreLease ? (cur?.lease ?? 0) : r.lease
        let prev = txn.put(key, value: value, lease: lease, prevValue: r.prevKv)
        var resp = PutResponse()
        if r.prevKv, let prev { resp.prevKv = prev.proto }
        return resp
    }

    private func applyDelete(_ r: DeleteRangeRequest, _ txn: WriteTxn) -> DeleteRangeResponse {
        let prevs = txn.deleteRange(r.key.bytes, r.rangeEnd.bytes, prevValues: r.prevKv)
        var resp = DeleteRangeResponse()
        resp.deleted = Int64(prevs.count)
        if r.prevKv { resp.prevKvs = prevs.map(\.proto) }
        return resp
    }

    /// A top-level Put. Returns the response and the revision to wait for.
    public func put(_ r: PutRequest) throws(EtcdError) -> (PutResponse, Int64) {
        try validatePut(r)
        try ctx.checkQuota(Self.putCost(r))
        let txn = store.beginWrite()
        try checkPutApplicable(r, txn)
        var resp = applyPut(r, txn)
        let rev = end(txn)
        resp.header = ctx.header(rev)
        return (resp, rev)
    }

    public func deleteRange(_ r: DeleteRangeRequest) throws(EtcdError) -> (DeleteRangeResponse, Int64) {
        try validateDelete(r)
        let txn = store.beginWrite()
        var resp = applyDelete(r, txn)
        let rev = end(txn)
        resp.header = ctx.header(rev)
        return (resp, rev)
    }

    /// Ends a write transaction (the store tells its observers) and returns the revision the
    /// response reports.
    private func end(_ txn: WriteTxn) -> Int64 {
        txn.end().isEmpty ? store.currentRevision : txn.revision
    }

    // MARK: Txn

    /// etcd's quota cost of a put: its size plus a fixed overhead for the index.
    static func putCost(_ r: PutRequest) -> Int { r.key.count + r.value.count + 256 }

    /// The cost of every put in a txn, both branches and nested txns.
    static func txnCost(_ r: TxnRequest) -> Int {
        var cost = 0
        for op in r.success + r.failure {
            switch op.request {
            case .requestPut(let p): cost += putCost(p)
            case .requestTxn(let t): cost += txnCost(t)
            default: break
            }
        }
        return cost
    }

    /// - Parameter validated: the caller already ran `validate(txn:)` (the gRPC route does, before
    ///   the permission check, as etcd orders them): its walk over the ops is not repeated.
    public func txn(_ r: TxnRequest, validated: Bool = false) throws(EtcdError) -> (TxnResponse, Int64) {
        if !validated { try validate(txn: r) }
        try ctx.checkQuota(Self.txnCost(r))
        let txn = store.beginWrite()
        // All compares, nested ones included, are decided against the state before any op runs.
        let path = decidePath(r, txn)
        try checkPath(r, path, txn)
        var pathIndex = 0
        var resp = execute(r, path, &pathIndex, txn)
        let rev = end(txn)
        resp.header = ctx.header(rev)
        return (resp, rev)
    }

    /// The checks etcd's API layer makes before anything else (auth included): op counts, empty
    /// keys, unset ops, put flags, duplicate keys.
    public func validate(txn r: TxnRequest) throws(EtcdError) {
        try validateTxn(r, budget: ctx.limits.maxTxnOps)
        _ = try checkIntervals(r.success)
        _ = try checkIntervals(r.failure)
    }

    /// etcd's checkTxnRequest: op counts, empty keys, unset ops, put flags, recursively.
    private func validateTxn(_ r: TxnRequest, budget: Int) throws(EtcdError) {
        let opc = max(r.compare.count, r.success.count, r.failure.count)
        if opc > budget { throw .tooManyOps }
        for c in r.compare where c.key.isEmpty { throw .emptyKey }
        for op in r.success + r.failure {
            switch op.request {
            case .none: throw .keyNotFound
            case .requestRange(let q): if q.key.isEmpty { throw .emptyKey }
            case .requestPut(let q): try validatePut(q)
            case .requestDeleteRange(let q): try validateDelete(q)
            case .requestTxn(let t): try validateTxn(t, budget: budget - opc)
            }
        }
    }

    private struct DeleteIntervals {
        var ivs: [(Bytes, Bytes)] = []
        /// etcd compares raw bounds here: a from-key end ("\0") makes an empty interval.
        func contains(_ k: Bytes) -> Bool {
            for (key, end) in ivs {
                if end.isEmpty {
                    if k == key { return true }
                } else if compareBytes(k, key) >= 0 && compareBytes(k, end) < 0 {
                    return true
                }
            }
            return false
        }
    }

    /// etcd's checkIntervals: no key put twice on one path, and no put inside a delete range.
    private func checkIntervals(_ ops: [RequestOp]) throws(EtcdError) -> (Set<Bytes>, DeleteIntervals) {
        var dels = DeleteIntervals()
        for op in ops {
            if case .requestDeleteRange(let d) = op.request { dels.ivs.append((d.key.bytes, d.rangeEnd.bytes)) }
        }
        var puts = Set<Bytes>()
        for op in ops {
            guard case .requestTxn(let t) = op.request else { continue }
            let (putsThen, delsThen) = try checkIntervals(t.success)
            let (putsElse, delsElse) = try checkIntervals(t.failure)
            for k in putsThen {
                if puts.contains(k) || dels.contains(k) { throw .duplicateKey }
                puts.insert(k)
            }
            for k in putsElse {
                if puts.contains(k) && !putsThen.contains(k) { throw .duplicateKey }
                if dels.contains(k) { throw .duplicateKey }
                puts.insert(k)
            }
            dels.ivs += delsThen.ivs + delsElse.ivs
        }
        for op in ops {
            guard case .requestPut(let p) = op.request else { continue }
            let k = p.key.bytes
            if puts.contains(k) || dels.contains(k) { throw .duplicateKey }
            puts.insert(k)
        }
        return (puts, dels)
    }

    /// The branch taken at each txn level, depth-first (etcd's compareToPath).
    private func decidePath(_ r: TxnRequest, _ txn: WriteTxn) -> [Bool] {
        var path: [Bool] = []
        func walk(_ t: TxnRequest) {
            let ok = t.compare.allSatisfy { evaluate($0, txn) }
            path.append(ok)
            for op in ok ? t.success : t.failure {
                if case .requestTxn(let inner) = op.request { walk(inner) }
            }
        }
        walk(r)
        return path
    }

    /// A compare holds if every key in its range satisfies it; with no key, VALUE fails and the
    /// other targets compare against a zero key-value.
    private func evaluate(_ c: Compare, _ txn: WriteTxn) -> Bool {
        let kvs: [KeyValue]
        let values = c.target == .value
        if c.rangeEnd.isEmpty {
            kvs = txn.get(c.key.bytes, withValue: values).map { [$0] } ?? []
        } else {
            kvs = (try? txn.range(c.key.bytes, c.rangeEnd.bytes, keysOnly: !values).kvs) ?? []
        }
        if kvs.isEmpty {
            if c.target == .value { return false }
            return compareOne(c, KeyValue(key: c.key.bytes))
        }
        return kvs.allSatisfy { compareOne(c, $0) }
    }

    private func compareOne(_ c: Compare, _ kv: KeyValue) -> Bool {
        let order: Int
        switch c.target {
        case .value:
            var want = Bytes()
            if case .value(let v) = c.targetUnion { want = v.bytes }
            order = compareBytes(kv.value, want)
        default:
            let have: Int64
            switch c.target {
            case .version: have = kv.version
            case .create: have = kv.createRevision
            case .mod: have = kv.modRevision
            case .lease: have = kv.lease
            default: return false
            }
            var want: Int64 = 0
            switch c.targetUnion {
            case .version(let v)?: want = v
            case .createRevision(let v)?: want = v
            case .modRevision(let v)?: want = v
            case .lease(let v)?: want = v
            default: want = 0
            }
            order = have < want ? -1 : (have > want ? 1 : 0)
        }
        switch c.result {
        case .equal: return order == 0
        case .notEqual: return order != 0
        case .greater: return order > 0
        case .less: return order < 0
        case .UNRECOGNIZED: return false
        }
    }

    /// Checks every op on the chosen path before any is applied, so an error leaves nothing behind.
    private func checkPath(_ r: TxnRequest, _ path: [Bool], _ txn: WriteTxn) throws(EtcdError) {
        var i = 0
        func walk(_ t: TxnRequest) throws(EtcdError) {
            let ok = path[i]
            i += 1
            for op in ok ? t.success : t.failure {
                switch op.request {
                case .requestRange(let q):
                    if q.revision > 0 {
                        do { _ = try store.resolve(revision: q.revision, latest: store.currentRevision) } catch {
                            throw EtcdError.from(error)
                        }
                    }
                case .requestPut(let q): try checkPutApplicable(q, txn)
                case .requestTxn(let inner): try walk(inner)
                case .requestDeleteRange, .none: break
                }
            }
        }
        try walk(r)
    }

    private func execute(_ r: TxnRequest, _ path: [Bool], _ i: inout Int, _ txn: WriteTxn) -> TxnResponse {
        let ok = path[i]
        i += 1
        var resp = TxnResponse()
        resp.succeeded = ok
        for op in ok ? r.success : r.failure {
            var out = ResponseOp()
            switch op.request {
            case .requestRange(let q):
                // Checked above, so the read cannot fail.
                let result =
                    (try? txn.range(
                        q.key.bytes, q.rangeEnd.bytes, revision: q.revision, limit: fetchLimit(q),
                        countOnly: q.countOnly, keysOnly: q.keysOnly)) ?? RangeResult(kvs: [], count: 0, revision: 0)
                var rr = finishRange(q, result)
                rr.header.revision = result.revision
                out.response = .responseRange(rr)
            case .requestPut(let q):
                var pr = applyPut(q, txn)
                pr.header.revision = txn.revision
                out.response = .responsePut(pr)
            case .requestDeleteRange(let q):
                var dr = applyDelete(q, txn)
                dr.header.revision = txn.changed ? txn.revision : store.currentRevision
                out.response = .responseDeleteRange(dr)
            case .requestTxn(let inner):
                var tr = execute(inner, path, &i, txn)
                // etcd gives a nested txn's answer an empty header (no revision).
                tr.header = Etcdserverpb_ResponseHeader()
                out.response = .responseTxn(tr)
            case .none:
                break
            }
            resp.responses.append(out)
        }
        return resp
    }

    // MARK: Compact

    /// Compacts history at `revision`. Returns the header revision.
    public func compact(_ r: Etcdserverpb_CompactionRequest) throws(EtcdError) -> Int64 {
        do { try store.compact(r.revision) } catch { throw EtcdError.from(error) }
        return store.currentRevision
    }
}
