import VigilCore

/// A clock that moves only when told (for leases, tokens and anything else measured in
/// milliseconds): tests decide what time it is.
public final class ManualClock: MonotonicClock, @unchecked Sendable {
    public private(set) var nowMilliseconds: UInt64

    public init(startingAt ms: UInt64 = 1_000_000) { nowMilliseconds = ms }

    /// Moves the clock forward.
    public func advance(milliseconds: UInt64) { nowMilliseconds += milliseconds }

    public func advance(seconds: Double) { nowMilliseconds += UInt64(seconds * 1000) }
}
