import Testing

@testable import GRPC

@Suite struct FramingTests {
    @Test func framesRoundTripAcrossSplitReads() throws {
        var framer = MessageFramer(maxMessageBytes: 1 << 20)
        let a = MessageFramer.frame([1, 2, 3])
        let b = MessageFramer.frame([])
        let c = MessageFramer.frame(Array(repeating: 7, count: 300))
        let all = a + b + c
        var got: [[UInt8]] = []
        // Feed one byte at a time: messages must come out whole and in order.
        for byte in all {
            [byte].withUnsafeBytes { framer.append($0) }
            while let m = try framer.next() { got.append(m) }
        }
        #expect(got == [[1, 2, 3], [], Array(repeating: 7, count: 300)])
    }

    @Test func oversizedMessageIsRefusedFromItsHeader() {
        var framer = MessageFramer(maxMessageBytes: 10)
        // Only the 5-byte prefix arrives: the length alone is enough to refuse.
        ([0, 0, 0, 0, 11] as [UInt8]).withUnsafeBytes { framer.append($0) }
        #expect(throws: MessageFramer.Failure.tooLarge(11, max: 10)) { try framer.next() }
    }

    @Test func compressedFlagIsRefused() {
        var framer = MessageFramer(maxMessageBytes: 10)
        ([1, 0, 0, 0, 1, 9] as [UInt8]).withUnsafeBytes { framer.append($0) }
        #expect(throws: MessageFramer.Failure.compressed) { try framer.next() }
    }
}

@Suite struct StatusTests {
    @Test func messageIsPercentEncodedAndDecoded() {
        let s = GRPCStatus(.outOfRange, "etcdserver: mvcc: 100% ünïcode")
        #expect(s.encodedMessage == "etcdserver: mvcc: 100%25 %C3%BCn%C3%AFcode")
        #expect(GRPCStatus.decodeMessage(s.encodedMessage) == s.message)
    }

    @Test func timeouts() {
        #expect(parseGRPCTimeout("5S") == 5000)
        #expect(parseGRPCTimeout("100m") == 100)
        #expect(parseGRPCTimeout("1500u") == 2)
        #expect(parseGRPCTimeout("2M") == 120_000)
        #expect(parseGRPCTimeout("1H") == 3_600_000)
        #expect(parseGRPCTimeout("999999999S") == nil, "more than 8 digits")
        #expect(parseGRPCTimeout("10x") == nil)
        #expect(parseGRPCTimeout("S") == nil)
    }
}
