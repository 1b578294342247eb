import ArgumentParser
import Foundation
import Logging

/// Fleetcast: signed, optionally encrypted software updates for a fleet.
struct Fleetcast: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fleetcast",
        abstract: "Build, send, receive, verify and install signed, encrypted software updates.",
        discussion: """
        Step A (vendor): `keygen` makes signing and device keys, `pack` turns images into a \
        signed bundle. Devices: `verify` checks signatures, expiry, hardware, anti-rollback, \
        sizes and every hash, decrypts, and writes the components. `send` multicasts a bundle \
        to a fleet; `receive` takes it (steps B, 1, 2); `agent` is the device agent that also \
        installs it into the spare A/B side, reboots into it, health-checks, and confirms or \
        rolls back (steps 3, 4). `demo` runs step A and step 2 on a generated image and shows \
        forged bundles being refused; `scripts/demo` runs the whole fleet.

        Exit status: 0 success; 10 malformed; 11 unknown critical field; 12 signature; \
        13 expired; 14 incompatible hardware; 15 rollback; 16 size mismatch; 17 hash \
        mismatch; 18 not a recipient; 19 decryption failed; 20 I/O; 21 invalid input; \
        64 usage.
        """,
        subcommands: [Keygen.self, Delegate.self, Pack.self, Inspect.self, Verify.self, Send.self, Receive.self, Agent.self, Demo.self, Simulate.self, Inject.self]
    )
}

LoggingSystem.bootstrap { label in
    var handler = StreamLogHandler.standardError(label: label)
    handler.logLevel = ProcessEnvironment.verbose ? .debug : .info
    return handler
}
Fleetcast.main()
