import EtcdProto
import GRPC
import MVCC
import VigilCore

extension EtcdServices {
    /// The KV service: reads answer at once from committed state; writes answer once durable.
    /// Shape and size are checked before the sender's permissions, as etcd orders them.
    func registerKV() {
        let kv = self.kv
        let ctx = context
        let auth = self.auth

        unary(
            .range,
            access: .keys { c, r throws(EtcdError) in
                try auth.check(c, .read, key: r.key.bytes, rangeEnd: r.rangeEnd.bytes)
            },
            validate: { r, _ throws(EtcdError) in if r.key.isEmpty { throw .emptyKey } },
            handle: { (r: Etcdserverpb_RangeRequest, _, reply: Reply<Etcdserverpb_RangeResponse>) throws(EtcdError) in
                reply.ok(try kv.range(r))
            })
        unary(
            .put,
            access: .keys { c, r throws(EtcdError) in try auth.check(c, put: r) },
            validate: { r, n throws(EtcdError) in
                try ctx.checkSize(n)
                try kv.validatePut(r)
            },
            handle: { (r: Etcdserverpb_PutRequest, _, reply: Reply<Etcdserverpb_PutResponse>) throws(EtcdError) in
                let (resp, rev) = try kv.put(r)
                ctx.commits.whenDurable(rev) { reply.ok(resp) }
            })
        unary(
            .deleteRange,
            access: .keys { c, r throws(EtcdError) in try auth.check(c, deleteRange: r) },
            validate: { r, n throws(EtcdError) in
                try ctx.checkSize(n)
                try kv.validateDelete(r)
            },
            handle: {
                (
                    r: Etcdserverpb_DeleteRangeRequest, _, reply: Reply<Etcdserverpb_DeleteRangeResponse>
                ) throws(EtcdError) in
                let (resp, rev) = try kv.deleteRange(r)
                ctx.commits.whenDurable(rev) { reply.ok(resp) }
            })
        unary(
            .txn,
            access: .keys { c, r throws(EtcdError) in try auth.check(c, txn: r) },
            validate: { r, n throws(EtcdError) in
                try ctx.checkSize(n)
                try kv.validate(txn: r)
            },
            handle: { (r: Etcdserverpb_TxnRequest, _, reply: Reply<Etcdserverpb_TxnResponse>) throws(EtcdError) in
                let (resp, _) = try kv.txn(r, validated: true)
                // A txn may have read state that is not durable yet: answer once all of it is.
                ctx.commits.whenDurable(ctx.store.currentRevision) { reply.ok(resp) }
            })
        unary(
            .compact,
            access: .admin,
            validate: { _, n throws(EtcdError) in try ctx.checkSize(n) },
            handle: {
                (r: Etcdserverpb_CompactionRequest, _, out: Reply<Etcdserverpb_CompactionResponse>) throws(EtcdError) in
                let rev = try kv.compact(r)
                var resp = Etcdserverpb_CompactionResponse()
                resp.header = ctx.header(rev)
                // Answered once the compaction (and the revision its header names) is durable, as
                // etcd answers once it is applied: a crash cannot undo an acknowledged compaction,
                // and no later read sees an older revision than its header.
                ctx.commits.whenFlushed {
                    if r.physical { ctx.whenCompacted { out.ok(resp) } } else { out.ok(resp) }
                }
            })
    }
}
