import EtcdProto
import Foundation
import MVCC
import SwiftProtobuf

/// etcd's `--namespace`: the proxy's clients see the upstream keys under a prefix as the whole key
/// space. Keys going upstream get the prefix; keys coming back lose it (clientv3's namespace
/// package, which etcd's grpc-proxy wraps its KV, Watch and Lease clients in).
public struct Namespace: Sendable {
    public let prefix: [UInt8]
    public init(_ prefix: [UInt8]) { self.prefix = prefix }

    public var isEmpty: Bool { prefix.isEmpty }

    /// A client key as upstream stores it.
    func key(_ k: [UInt8]) -> [UInt8] { prefix + k }

    /// A client range end as upstream reads it: "\0" (every key from the start) becomes the end of
    /// the namespace; no end (one key) stays none.
    func end(_ e: [UInt8]) -> [UInt8] {
        if e.isEmpty { return e }
        if e == [0] { return KeyRange.prefixEnd(prefix) }
        return prefix + e
    }

    /// An upstream key as the client sees it.
    func strip(_ k: [UInt8]) -> [UInt8] {
        prefix.isEmpty || !k.starts(with: prefix) ? k : Array(k.dropFirst(prefix.count))
    }

    private func key(_ d: Data) -> Data { Data(prefix) + d }
    private func end(_ d: Data) -> Data {
        let bytes: [UInt8] = end(Array(d))
        return Data(bytes)
    }
    private func strip(_ d: Data) -> Data { d.starts(with: prefix) ? Data(d.dropFirst(prefix.count)) : d }

    private func strip(_ kv: Mvccpb_KeyValue) -> Mvccpb_KeyValue {
        var kv = kv
        kv.key = Data(strip(kv.key))
        return kv
    }

    /// A forwarded request with its keys moved into the namespace (KV requests and Lease
    /// TimeToLive; others pass as they are).
    func request(_ m: any SwiftProtobuf.Message) -> any SwiftProtobuf.Message {
        if prefix.isEmpty { return m }
        switch m {
        case var r as Etcdserverpb_RangeRequest:
            r.key = key(r.key)
            r.rangeEnd = end(r.rangeEnd)
            return r
        case var r as Etcdserverpb_PutRequest:
            r.key = key(r.key)
            return r
        case var r as Etcdserverpb_DeleteRangeRequest:
            r.key = key(r.key)
            r.rangeEnd = end(r.rangeEnd)
            return r
        case let r as Etcdserverpb_TxnRequest:
            return txn(r)
        default:
            return m
        }
    }

    private func txn(_ t: Etcdserverpb_TxnRequest) -> Etcdserverpb_TxnRequest {
        var t = t
        t.compare = t.compare.map { c in
            var c = c
            c.key = key(c.key)
            c.rangeEnd = end(c.rangeEnd)
            return c
        }
        func op(_ o: Etcdserverpb_RequestOp) -> Etcdserverpb_RequestOp {
            var o = o
            switch o.request {
            case .requestRange(let r): o.requestRange = request(r) as! Etcdserverpb_RangeRequest
            case .requestPut(let r): o.requestPut = request(r) as! Etcdserverpb_PutRequest
            case .requestDeleteRange(let r): o.requestDeleteRange = request(r) as! Etcdserverpb_DeleteRangeRequest
            case .requestTxn(let r): o.requestTxn = txn(r)
            case .none: break
            }
            return o
        }
        t.success = t.success.map(op)
        t.failure = t.failure.map(op)
        return t
    }

    /// An upstream answer with its keys taken out of the namespace.
    func response(_ m: any SwiftProtobuf.Message) -> any SwiftProtobuf.Message {
        if prefix.isEmpty { return m }
        switch m {
        case var r as Etcdserverpb_RangeResponse:
            r.kvs = r.kvs.map(strip)
            return r
        case var r as Etcdserverpb_PutResponse:
            if r.hasPrevKv { r.prevKv = strip(r.prevKv) }
            return r
        case var r as Etcdserverpb_DeleteRangeResponse:
            r.prevKvs = r.prevKvs.map(strip)
            return r
        case var r as Etcdserverpb_TxnResponse:
            r.responses = r.responses.map { o in
                var o = o
                switch o.response {
                case .responseRange(let x): o.responseRange = response(x) as! Etcdserverpb_RangeResponse
                case .responsePut(let x): o.responsePut = response(x) as! Etcdserverpb_PutResponse
                case .responseDeleteRange(let x):
                    o.responseDeleteRange = response(x) as! Etcdserverpb_DeleteRangeResponse
                case .responseTxn(let x): o.responseTxn = response(x) as! Etcdserverpb_TxnResponse
                case .none: break
                }
                return o
            }
            return r
        case var r as Etcdserverpb_LeaseTimeToLiveResponse:
            // Keys outside the namespace are not the client's to see.
            r.keys = r.keys.filter { $0.starts(with: prefix) }.map(strip)
            return r
        default:
            return m
        }
    }
}
