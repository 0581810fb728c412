import Foundation
import Testing
import VigilTesting

/// `Examples/live-config/index.html` in headless Chromium (Debian's `chromium`, driven by
/// `scripts/browser-page.py` over the DevTools protocol): the page reads the keys under `config/`,
/// follows their changes over Server-Sent Events, and goes on after Vigil restarts.
@Suite(.serialized) struct LiveConfigPageTests {
    struct Shown {
        var state: String
        var revision: String
        var rows: [String: String]
    }

    /// What the page shows now (nil if it could not be read).
    func shown(_ browser: BackgroundCommand) -> Shown? {
        let before = browser.output.components(separatedBy: "\n").filter { $0.hasPrefix("= ") }.count
        browser.write(
            ##"JSON.stringify({state: document.getElementById("state").textContent, revision: document.getElementById("revision").textContent, rows: Object.fromEntries([...document.querySelectorAll("#keys tr")].map(tr => [tr.dataset.key, tr.querySelector(".value").textContent]))})"##
                + "\n")
        var line: String?
        browser.wait(timeout: 10) { out in
            let answers = out.components(separatedBy: "\n").filter { $0.hasPrefix("= ") }
            if answers.count > before { line = answers[before] }
            return line != nil
        }
        guard let line,
            let text = try? JSONSerialization.jsonObject(with: Data(line.dropFirst(2).utf8), options: .fragmentsAllowed)
                as? String,
            let object = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]
        else { return nil }
        return Shown(
            state: object["state"] as? String ?? "", revision: object["revision"] as? String ?? "",
            rows: object["rows"] as? [String: String] ?? [:])
    }

    /// Polls the page until `condition` holds (or 15 s pass); returns the last thing it showed.
    func waitFor(_ browser: BackgroundCommand, _ condition: (Shown) -> Bool) -> Shown? {
        let deadline = Date().addingTimeInterval(15)
        var last: Shown?
        while Date() < deadline {
            last = shown(browser)
            if let last, condition(last) { return last }
            usleep(200_000)
        }
        return last
    }

    @Test func thePageFollowsChangesAndAVigilRestart() throws {
        _ = try #require(which("chromium"), "Debian's chromium (scripts/install-deps.sh --test)")
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let server = try LiveServer(args: [])
        let ctl = try Etcdctl(endpoint: server.endpoint)
        _ = try ctl.ok("put", "config/a", "1")
        _ = try ctl.ok("put", "config/b", "2")
        _ = try ctl.ok("put", "other/x", "not followed")
        let page =
            root.appendingPathComponent("Examples/live-config/index.html").absoluteString
            + "?endpoint=\(server.url)&prefix=config/"
        let browser = try BackgroundCommand(
            "/usr/bin/python3", [root.appendingPathComponent("scripts/browser-page.py").path, page])
        defer { browser.stop() }

        let first = waitFor(browser) { $0.state == "live" }
        #expect(first?.rows == ["config/a": "1", "config/b": "2"], "\(browser.output)")
        #expect(first?.revision == "4")

        // Live changes.
        _ = try ctl.ok("put", "config/a", "changed")
        _ = try ctl.ok("del", "config/b")
        _ = try ctl.ok("put", "config/c", "3")
        let live = waitFor(browser) { $0.rows["config/c"] != nil }
        #expect(live?.rows == ["config/a": "changed", "config/c": "3"])
        #expect(live?.revision == "7")

        // Vigil goes away and comes back: the page reconnects and resumes after its last event,
        // and a change made while it was away (here, just after the restart) arrives once.
        try server.restart()
        _ = try ctl.ok("put", "config/d", "after restart")
        _ = try ctl.ok("put", "other/y", "not followed either")
        _ = try ctl.ok("put", "config/a", "again")
        let after = waitFor(browser) { $0.rows["config/a"] == "again" && $0.state == "live" }
        #expect(
            after?.rows == ["config/a": "again", "config/c": "3", "config/d": "after restart"], "\(browser.output)")
        #expect(after?.revision == "10")
    }
}
