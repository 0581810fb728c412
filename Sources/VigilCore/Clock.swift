/// Milliseconds on a monotonic clock: what lease expiry and token lifetimes are measured in.
///
/// The server hands its loop's clock to the parts that need time (`LoopClock` in VigilServer);
/// tests hand them a `ManualClock` (VigilTesting) and move it by hand. Nothing in the core reads
/// the system clock itself.
public protocol MonotonicClock: AnyObject {
    /// Milliseconds since an arbitrary start; never goes back.
    var nowMilliseconds: UInt64 { get }
}
