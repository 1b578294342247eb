// swift-tools-version: 6.1
// Benchmarks for Fleetcast, a separate package so that the main build stays lean.
// Run through bench/run, which writes bench/RESULTS.md.
import PackageDescription

let package = Package(
    name: "FleetcastBench",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: "../"),
        // Only for the transport comparison (bench/sockets); the product itself does not use SwiftNIO.
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.0"),
    ],
    targets: [
        .executableTarget(
            name: "SocketBench",
            dependencies: [
                .product(name: "Transport", package: "main"), .product(name: "DeliveryCore", package: "main"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "ErasureBench",
            dependencies: [.product(name: "ErasureCoding", package: "main"), .product(name: "SeededRandom", package: "main")],
            swiftSettings: [.unsafeFlags(["-Ounchecked"])]
        ),
    ]
)
