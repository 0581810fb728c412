import ArgumentParser
import Foundation
import Robustness

/// `make robustness`: runs the robustness profiles (seeded traffic, faults, validators) and says
/// what each found. A violation prints its seed, the failpoint, and the smallest piece of history
/// that shows it; `--seed` runs the same traffic again.
@main
struct VigilRobustness: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vigil-robustness",
        abstract: "Seeded traffic, faults and validators against vigil, etcd and the mirror.")

    @Option(help: "Profiles to run (comma-separated); `list` lists them; default: all.")
    var profiles: String?
    @Option(help: "The first seed (each run takes the next); default: from the clock.")
    var seed: UInt64?
    @Option(help: "Run each profile this many times, with different seeds.")
    var rounds = 1
    @Option(help: "Where histories and logs of failed runs go.")
    var output = ".build/robustness"
    @Flag(help: "Only CI's short profiles.")
    var ci = false
    @Option(help: "Validate a recorded history (a failed run's history.json) instead of running.")
    var validate: String?
    @Option(help: "Run each profile this many seconds (its faults scaled to fit).")
    var seconds: Double?
    @Flag(help: "Keep every run's history and log, not only a failed run's.")
    var keepHistory = false

    func run() throws {
        if let validate {
            let h = try JSONDecoder().decode(History.self, from: Data(contentsOf: URL(fileURLWithPath: validate)))
            let start = Date()
            let violations = Validation.validate(h)
            for v in violations { print(v) }
            print("\(violations.count) violation(s), validated in \(Int(Date().timeIntervalSince(start) * 1000)) ms")
            if !violations.isEmpty { throw ExitCode(1) }
            return
        }
        let available =
            ci ? Profile.ci : Profile.all + Profile.ci.filter { p in !Profile.all.contains { $0.name == p.name } }
        if profiles == "list" {
            for p in available {
                print(
                    "\(p.name): \(p.target), \(Int(p.seconds)) s, \(p.faults.count) faults"
                        + (p.expect.isEmpty ? "" : ", broken on purpose"))
            }
            return
        }
        let wanted = profiles.map { Set($0.split(separator: ",").map(String.init)) }
        var chosen = available.filter { wanted?.contains($0.name) ?? true }
        if let seconds {
            for i in chosen.indices {
                let scale = seconds / chosen[i].seconds
                chosen[i].seconds = seconds
                for j in chosen[i].faults.indices { chosen[i].faults[j].at *= scale }
            }
        }
        guard !chosen.isEmpty else { throw ValidationError("no such profile: \(profiles ?? "")") }
        var next = seed ?? UInt64(Date().timeIntervalSince1970 * 1000)
        var failed = 0
        for _ in 0..<rounds {
            for p in chosen {
                let report = try Runner.run(p, seed: next, output: output, keepHistory: keepHistory) { line in
                    FileHandle.standardError.write(Data((line + "\n").utf8))
                }
                next &+= 1
                FileHandle.standardOutput.write(Data((report.summary + "\n").utf8))
                if !report.passed { failed += 1 }
            }
        }
        print("\(chosen.count * rounds - failed) of \(chosen.count * rounds) runs passed")
        if failed > 0 { throw ExitCode(1) }
    }
}
