// libFuzzer entry point (built by scripts/fuzz.sh with -sanitize=fuzzer,address -DFUZZING), or,
// in an ordinary build, a replayer: `vigil-fuzz <target> <file or directory>...`.
import Foundation
import FuzzHarness

#if FUZZING
private let target = ProcessInfo.processInfo.environment["VIGIL_FUZZ_TARGET"] ?? "connection"

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    FuzzHarness.run(target, size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func runDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

/// SwiftPM links executables with `main` aliased to `<module>_main`; hand over to libFuzzer's
/// driver from there.
@_cdecl("vigil_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return runDriver(&argc, &argv) { data, size in fuzzOne(data, size) }
}
#else
@main
enum Replay {
    static func main() {
        let args = CommandLine.arguments.dropFirst()
        guard let target = args.first, FuzzHarness.targets.contains(target) else {
            FileHandle.standardError.write(
                Data("usage: vigil-fuzz <\(FuzzHarness.targets.joined(separator: "|"))> <file or dir>...\n".utf8))
            exit(2)
        }
        let files = FuzzHarness.files(Array(args.dropFirst()))
        for f in files {
            FuzzHarness.run(target, Array((try? Data(contentsOf: URL(fileURLWithPath: f))) ?? Data()))
        }
        print("\(target): \(files.count) inputs replayed")
    }
}
#endif
