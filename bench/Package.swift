// swift-tools-version: 6.1
// Benchmarks for Fleetcast, a separate package so that the main build stays lean.
// Run through bench/run, which writes bench/RESULTS.md.
import PackageDescription

let package = Package(
    name: "FleetcastBench",
    platforms: [.macOS(.v15)],
    dependencies: [.package(path: "../")],
    targets: [
        .executableTarget(
            name: "ErasureBench",
            dependencies: [.product(name: "ErasureCoding", package: "main"), .product(name: "SeededRandom", package: "main")],
            swiftSettings: [.unsafeFlags(["-Ounchecked"])]
        ),
    ]
)
