import EtcdProto
import Foundation
import GRPC
import SwiftProtobuf
import Testing
import VigilCore
import VigilTesting

/// The transport as clients see it: gRPC statuses for bad calls, HTTP/1.1 on the same port.
@Suite(.serialized) struct ProtocolTests {
    let server: LiveServer

    init() throws {
        server = try LiveServer(args: ["--unsafe-no-fsync", "--max-request-bytes", "1000"])
    }

    @Test func unknownMethodIsUnimplemented() throws {
        let c = try BlockingClient(port: server.port)
        guard case .failure(let s) = c.unary("/etcdserverpb.KV/NoSuchMethod", []) else {
            Issue.record("expected a failure")
            return
        }
        #expect(s.code == .unimplemented)
        // The connection keeps serving after the error.
        var put = Etcdserverpb_PutRequest()
        put.key = Data("k".utf8)
        let r = c.call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self)
        #expect((try? r.get())?.header.revision == 2)
    }

    @Test func malformedMessageIsInternalError() throws {
        let c = try BlockingClient(port: server.port)
        guard case .failure(let s) = c.unary(EtcdMethod.range.path, [0xFF, 0xFF, 0xFF]) else {
            Issue.record("expected a failure")
            return
        }
        #expect(s.code == .internal)
    }

    @Test func requestLimits() throws {
        let c = try BlockingClient(port: server.port)
        // Over --max-request-bytes (1000 here) but under the gRPC limit: etcd's error.
        var put = Etcdserverpb_PutRequest()
        put.key = Data("big".utf8)
        put.value = Data(repeating: 1, count: 2000)
        guard case .failure(let s) = c.call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self) else {
            Issue.record("expected a failure")
            return
        }
        #expect(s == GRPCStatus(.invalidArgument, "etcdserver: request is too large"))
        // Over the gRPC receive limit (max-request-bytes + 512 KiB): refused from the frame header.
        put.value = Data(repeating: 1, count: 1000 + 512 * 1024 + 10)
        guard case .failure(let s2) = c.call(EtcdMethod.put.path, put, as: Etcdserverpb_PutResponse.self) else {
            Issue.record("expected a failure")
            return
        }
        #expect(s2.code == .resourceExhausted)
        #expect(s2.message.hasPrefix("grpc: received message larger than max"))
    }

    @Test func errorsCarryEtcdCodesAndText() throws {
        let c = try BlockingClient(port: server.port)
        var range = Etcdserverpb_RangeRequest()
        guard case .failure(let empty) = c.call(EtcdMethod.range.path, range, as: Etcdserverpb_RangeResponse.self)
        else {
            Issue.record("expected a failure")
            return
        }
        #expect(empty == GRPCStatus(.invalidArgument, "etcdserver: key is not provided"))
        range.key = Data("a".utf8)
        range.revision = 100
        guard case .failure(let future) = c.call(EtcdMethod.range.path, range, as: Etcdserverpb_RangeResponse.self)
        else {
            Issue.record("expected a failure")
            return
        }
        #expect(future == GRPCStatus(.outOfRange, "etcdserver: mvcc: required revision is a future revision"))
        var txn = Etcdserverpb_TxnRequest()
        txn.success = [Etcdserverpb_RequestOp()]
        guard case .failure(let unset) = c.call(EtcdMethod.txn.path, txn, as: Etcdserverpb_TxnResponse.self) else {
            Issue.record("expected a failure")
            return
        }
        #expect(unset == GRPCStatus(.invalidArgument, "etcdserver: key not found"))
    }

    @Test func nestedTxnAndReadsOfOwnWrites() throws {
        let c = try BlockingClient(port: server.port)
        func put(_ k: String, _ v: String) -> Etcdserverpb_RequestOp {
            var op = Etcdserverpb_RequestOp()
            var p = Etcdserverpb_PutRequest()
            p.key = Data(k.utf8)
            p.value = Data(v.utf8)
            op.requestPut = p
            return op
        }
        func get(_ k: String) -> Etcdserverpb_RequestOp {
            var op = Etcdserverpb_RequestOp()
            var r = Etcdserverpb_RangeRequest()
            r.key = Data(k.utf8)
            op.requestRange = r
            return op
        }
        var absent = Etcdserverpb_Compare()
        absent.key = Data("lock".utf8)
        absent.target = .create
        absent.result = .equal
        absent.createRevision = 0
        var inner = Etcdserverpb_TxnRequest()
        inner.compare = [absent]
        inner.success = [put("inner", "yes")]
        var innerOp = Etcdserverpb_RequestOp()
        innerOp.requestTxn = inner
        var txn = Etcdserverpb_TxnRequest()
        txn.compare = [absent]
        txn.success = [put("lock", "me"), get("lock"), innerOp]
        let r = try c.call(EtcdMethod.txn.path, txn, as: Etcdserverpb_TxnResponse.self).get()
        #expect(r.succeeded)
        #expect(r.header.revision == 2, "one revision for the whole txn")
        #expect(r.responses.count == 3)
        #expect(r.responses[1].responseRange.kvs.first?.value == Data("me".utf8), "reads see earlier writes")
        #expect(r.responses[2].responseTxn.succeeded, "nested compares are decided before any op runs")
        // As etcd: the nested txn's header is there but empty; its ops' headers carry the revision.
        #expect(r.responses[2].responseTxn.hasHeader && r.responses[2].responseTxn.header.revision == 0)
        #expect(r.responses[2].responseTxn.responses[0].responsePut.header.revision == 2)
        // A put twice on the same key across levels is refused.
        txn.success = [put("k", "1"), innerOp]
        inner.success = [put("k", "2")]
        innerOp.requestTxn = inner
        txn.success = [put("k", "1"), innerOp]
        guard case .failure(let dup) = c.call(EtcdMethod.txn.path, txn, as: Etcdserverpb_TxnResponse.self) else {
            Issue.record("expected a failure")
            return
        }
        #expect(dup.message == "etcdserver: duplicate key given in txn request")
    }

    @Test func http1OnTheSamePort() throws {
        let health = try rawExchange(
            port: server.port, Array("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        #expect(health.hasPrefix("HTTP/1.1 200"))
        #expect(health.hasSuffix(#"{"health":"true"}"#))
        let version = try rawExchange(
            port: server.port, Array("GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        #expect(version.contains(#""etcdcluster":"3.4.0""#))
        let missing = try rawExchange(
            port: server.port, Array("GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        #expect(missing.hasPrefix("HTTP/1.1 404"))
        #expect(missing.contains(#""code":5"#))
        let garbage = try rawExchange(port: server.port, Array("\u{01}\u{02} nonsense\r\n\r\n".utf8))
        #expect(garbage.hasPrefix("HTTP/1.1 400"))
        // Keep-alive: two requests on one connection get two answers.
        let two = try rawExchange(
            port: server.port,
            Array(
                "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    .utf8))
        #expect(two.components(separatedBy: "HTTP/1.1 200").count == 3)
    }
}
