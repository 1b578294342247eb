import ArgumentParser
import DeliveryCore
import DeviceAgent
import Foundation
import Transport
import UpdateBundle

/// Options shared by `send` and `receive`: where the session lives on the network.
struct NetworkOptions: ParsableArguments {
    @Option(help: "Multicast group (IPv4 or IPv6; administratively scoped 239.0.0.0/8 or ff15::/16 on a LAN).")
    var group: String = "239.192.0.42"

    @Option(help: "UDP port of the group.")
    var port: UInt16 = 4711

    @Option(help: "Network interface for multicast (e.g. eth1, lo). Default: the kernel's route for the group; name one on multi-homed hosts.")
    var interface: String?

    func groupAddress() throws -> SocketAddress { try SocketAddress(host: group, port: port) }
    func networkInterface() throws -> NetworkInterface? { try interface.map { try NetworkInterface(name: $0) } }
}

/// Exit statuses of `send` and `receive` beyond the verification codes 10-21.
enum NetworkExit {
    /// No session was heard within --timeout.
    static let timedOut: Int32 = 30
    /// The session ended (closed, went silent) before this receiver completed.
    static let sessionEnded: Int32 = 31
    /// Not every receiver completed (send).
    static let incompleteFleet: Int32 = 32
    /// Socket or interface trouble.
    static let network: Int32 = 33
}

/// Parses a rate in bits per second: "900M", "1G", "250k", "100000000".
func parseBitRate(_ text: String) -> Double? {
    let multipliers: [Character: Double] = ["k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9]
    // Finite and positive only: "inf" and "nan" parse as Doubles.
    if let last = text.last, let m = multipliers[last], let v = Double(text.dropLast()), v > 0, (v * m).isFinite { return v * m }
    return Double(text).flatMap { $0 > 0 && $0.isFinite ? $0 : nil }
}

/// Named limits of `send --rate`: below 8 kbit/s a 1,400-byte datagram would wait longer
/// than a session's timers; above 100 Gbit/s no link this runs on carries it.
let rateBitsPerSecondMin = 8_000.0, rateBitsPerSecondMax = 100e9

/// Parses a size in bytes: "8.6M", "32M", "1G", "65536" (decimal multiples).
func parseByteCount(_ text: String) -> Int? {
    parseBitRate(text).flatMap { $0 < Double(Int.max) ? Int($0) : nil }
}

func reportingTransportFailures(_ body: () throws -> Void) throws {
    do { try reportingFailures(body) } catch let error as TransportError {
        printError("network: \(error.reason)")
        throw ExitCode(error.code == .storage ? 20 : NetworkExit.network)
    } catch let error as StorageError {
        printError("storage: \(error.reason)")
        throw ExitCode(BundleError(.io, "").exitCode)
    } catch let error as ReceiveFailure {
        printError("\(error.reason.rawValue): \(error.text)")
        throw ExitCode(Receive.exitCode(error.reason))
    }
}

func formatRate(_ bytes: UInt64, _ seconds: Double) -> String {
    seconds > 0 ? String(format: "%.1f MB/s", Double(bytes) / seconds / 1e6) : "-"
}
