// swift-tools-version: 6.1
// Fleetcast: signed, optionally encrypted software updates over UDP multicast.
// Module map: ../shared/DESIGN.md. Pure modules import no sockets, no real clock,
// no OS randomness; system libraries are wrapped once each.
import PackageDescription

let package = Package(
    name: "Fleetcast",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "fleetcast", targets: ["fleetcast"]),
        .library(name: "BundleFormat", targets: ["BundleFormat"]),
        .library(name: "UpdateBundle", targets: ["UpdateBundle"]),
        .library(name: "ErasureCoding", targets: ["ErasureCoding"]),
        .library(name: "SeededRandom", targets: ["SeededRandom"]),
        .library(name: "Transport", targets: ["Transport"]),
        .library(name: "DeliveryCore", targets: ["DeliveryCore"]),
        .library(name: "DeviceAgent", targets: ["DeviceAgent"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // System libraries (installed by scripts/setup).
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CISAL", pkgConfig: "libisal", providers: [.apt(["libisal-dev"])]),

        // The only module that touches OpenSSL pointers.
        .target(name: "FleetCrypto", dependencies: ["COpenSSL"]),
        // Systematic Reed-Solomon over GF(2^8) on ISA-L.
        .target(name: "ErasureCoding", dependencies: ["CISAL"]),
        // Deterministic CBOR (RFC 8949 §4.2), strict decoder for untrusted input.
        .target(name: "CBOR"),
        // Seeded PRNG: all randomness in the core and the simulator comes from it.
        .target(name: "SeededRandom"),
        // Every datagram of Specs/protocol.md: strict parse, big-endian write.
        .target(name: "WireFormat"),
        // Steps B and 1 as sans-I/O state machines (Specs/protocol.md).
        .target(name: "DeliveryCore", dependencies: ["WireFormat", "ErasureCoding", "BundleFormat", "FleetCrypto", "SeededRandom"]),
        // Deterministic discrete-event network and storage simulator (tests, bench, `fleetcast simulate`).
        .target(name: "DeliverySimulation", dependencies: ["DeliveryCore", "WireFormat", "UpdateBundle", "FleetCrypto", "SeededRandom"]),
        // The device side as a library a device agent embeds: offers judged by the current
        // policy, staging and resume journal, step 2 and release (Specs/protocol.md §8.2). Pure
        // logic plus file I/O; no sockets (Transport), no CLI, no simulator. Backends that link C libraries
        // (bootloader tools, TPM, PKCS#11) will get a module of their own beside it.
        .target(name: "DeviceAgent", dependencies: ["DeliveryCore", "UpdateBundle", "WireFormat", "FleetCrypto", "CBOR"]),
        // What runs tools or links C libraries for the device (../shared/DESIGN.md): the
        // `grub` boot backend on Debian's grub-editenv (Specs/agent.md §3.3), the `uboot` one
        // on libubootenv's fw_printenv and fw_setenv (§3.4).
        .target(name: "DeviceBackends", dependencies: ["DeviceAgent", "CZlib", "ChildProcess"]),
        // The one way another program is run (tools, health checks, hooks, a live service, the
        // tests' daemons): posix_spawn with every other descriptor closed, waitpid on its PID.
        .target(name: "CSpawn"),
        .target(name: "ChildProcess", dependencies: ["CSpawn"]),
        // The crash explorer of the agent's install, activation and rollback (Specs/agent.md):
        // a disk that loses what was not fsynced, a power cut at every operation.
        .target(name: "AgentSimulation", dependencies: ["DeviceAgent", "DeviceBackends", "DeliveryCore", "FleetCrypto"]),
        // The few socket and clock system calls Swift's Glibc module does not export (sendmmsg, recvmmsg, ppoll).
        .target(name: "CSocket"),
        // Real UDP multicast and the real clock, and the pumps that feed datagrams and time into
        // a sender or a receiving endpoint (../shared/DESIGN.md decision 9). No device policy, no staging.
        .target(name: "Transport", dependencies: ["CSocket", "DeliveryCore", "WireFormat", "BundleFormat", "SeededRandom"]),
        // The bundle's formats as pure values: manifest, COSE_Sign1, the authentication
        // chain's layout and tags, key unwrapping, trust and device policy. No file I/O:
        // the delivery core sees block authentication through this module alone.
        .target(name: "BundleFormat", dependencies: ["FleetCrypto", "ErasureCoding", "CBOR"]),
        // Step A and step 2 on files: pack, open, verify, decrypt, decompress, release.
        .target(name: "CFileIO"),
        .target(name: "UpdateBundle", dependencies: ["BundleFormat", "FleetCrypto", "ErasureCoding", "CBOR", "CZlib", "CFileIO"]),

        .executableTarget(
            name: "fleetcast",
            dependencies: [
                "UpdateBundle", "FleetCrypto", "DeliverySimulation", "DeliveryCore", "DeviceAgent", "DeviceBackends", "AgentSimulation", "Transport", "WireFormat",
                "SeededRandom", "CSocket", "ChildProcess",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // How a device maker embeds the receiver in a socket loop of their own (DeviceAgent only).
        .executableTarget(name: "EmbeddedReceiverExample", dependencies: ["DeviceAgent"], path: "Examples/EmbeddedReceiver"),
        // libFuzzer entry point for the manifest and bundle parsers; built only by
        // scripts/fuzz with -sanitize=fuzzer (a plain build gets a tiny replay main).
        .executableTarget(name: "FuzzBundle", dependencies: ["UpdateBundle", "CBOR"]),

        .testTarget(name: "FleetCryptoTests", dependencies: ["FleetCrypto"]),
        .testTarget(name: "WireFormatTests", dependencies: ["WireFormat", "SeededRandom"]),
        .testTarget(name: "DeliveryTests", dependencies: ["DeliveryCore", "DeliverySimulation", "WireFormat", "UpdateBundle", "SeededRandom"]),
        .testTarget(name: "ErasureCodingTests", dependencies: ["ErasureCoding", "SeededRandom"]),
        .testTarget(name: "CBORTests", dependencies: ["CBOR"]),
        .testTarget(name: "TransportTests", dependencies: ["Transport", "DeliveryCore"]),
        // Public API only (no @testable import): DeviceAgent as a device maker embeds it.
        .testTarget(name: "DeviceAgentTests", dependencies: ["DeviceAgent", "DeliveryCore", "UpdateBundle", "WireFormat", "FleetCrypto"]),
        .testTarget(name: "AgentSimulationTests", dependencies: ["AgentSimulation", "DeviceAgent"]),
        .testTarget(name: "DeviceBackendsTests", dependencies: ["DeviceBackends", "DeviceAgent", "ChildProcess"]),
        .testTarget(name: "ChildProcessTests", dependencies: ["ChildProcess"]),
        .testTarget(
            name: "UpdateBundleTests",
            dependencies: ["UpdateBundle", "FleetCrypto", "CBOR", "SeededRandom", "ChildProcess"],
            resources: [.copy("Fixtures")]
        ),
        .testTarget(name: "CLITests", dependencies: ["fleetcast", "UpdateBundle", "FleetCrypto", "DeviceAgent", "DeviceBackends", "ChildProcess"]),
    ]
)
