import FleetCrypto

/// One of the two sides of an A/B device (Specs/agent.md §1).
public enum Side: Int, CaseIterable, Sendable, CustomStringConvertible {
    case a = 0, b = 1
    public var other: Side { self == .a ? .b : .a }
    public var description: String { self == .a ? "A" : "B" }
    public init?(name: String) {
        switch name.lowercased() {
        case "a": self = .a
        case "b": self = .b
        default: return nil
        }
    }
}

/// What the bootloader reads (Specs/agent.md §3): the boot order, and per side
/// whether it may boot, whether it is confirmed, and the trial boots left.
public struct BootState: Equatable, Sendable, CustomStringConvertible {
    public struct SideState: Equatable, Sendable {
        public var bootable: Bool
        public var confirmed: Bool
        /// Trial boots left: meaningful for a bootable side that is not confirmed.
        public var attempts: UInt8
        public init(bootable: Bool, confirmed: Bool, attempts: UInt8 = 0) {
            self.bootable = bootable; self.confirmed = confirmed; self.attempts = attempts
        }
    }

    /// Increases with every write; a reader takes the valid generation with the highest.
    public var generation: UInt64
    /// Each side once, first tried first.
    public var order: [Side]
    public var sides: [SideState]

    public init(generation: UInt64 = 1, order: [Side], a: SideState, b: SideState) {
        precondition(Set(order) == Set(Side.allCases) && order.count == 2, "the order names each side once")
        self.generation = generation; self.order = order; sides = [a, b]
    }

    /// A device as shipped: `current` bootable and confirmed, the other side empty.
    public static func initial(current: Side) -> BootState {
        var s = BootState(order: [current, current.other], a: .init(bootable: false, confirmed: false), b: .init(bootable: false, confirmed: false))
        s[current] = .init(bootable: true, confirmed: true)
        return s
    }

    public subscript(side: Side) -> SideState {
        get { sides[side.rawValue] }
        set { sides[side.rawValue] = newValue }
    }

    /// Whether the boot logic would boot `side` (bootable, and confirmed or on trial with attempts left).
    public func canBoot(_ side: Side) -> Bool { self[side].bootable && (self[side].confirmed || self[side].attempts > 0) }

    /// A side that is bootable and confirmed: what I1 requires always exists.
    public var confirmedSide: Side? { order.first { self[$0].bootable && self[$0].confirmed } }

    public var description: String {
        "gen \(generation) order \(order.map(\.description).joined()) " + Side.allCases.map { s in
            let st = self[s]
            return "\(s):\(st.bootable ? "bootable" : "-")\(st.confirmed ? ",confirmed" : st.bootable ? ",trial \(st.attempts)" : "")"
        }.joined(separator: " ")
    }

    // MARK: Encoding (Specs/agent.md §3.1)

    static let magic: [UInt8] = Array("FCB1".utf8)
    public static let encodedByteCount = 52

    public func encoded() -> [UInt8] {
        var out = Self.magic
        for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: generation >> UInt64(shift))) }
        out += order.map { UInt8($0.rawValue) }
        out += sides.map { UInt8($0.bootable ? 1 : 0) | UInt8($0.confirmed ? 2 : 0) }
        out += sides.map(\.attempts) + [0, 0]
        out += SHA256.hash(out)
        precondition(out.count == Self.encodedByteCount, "Specs/agent.md §3.1: a generation is 52 bytes")
        return out
    }

    /// Specs/agent.md A-1: a valid generation, or nil.
    public init?(decoding b: [UInt8]) {
        guard b.count == Self.encodedByteCount, Array(b[0..<4]) == Self.magic, SHA256.hash(Array(b[0..<20])) == Array(b[20..<52]) else { return nil }
        let generation = b[4..<12].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        guard let first = Side(rawValue: Int(b[12])), let second = Side(rawValue: Int(b[13])), first != second,
              b[14] & ~3 == 0, b[15] & ~3 == 0, b[18] == 0, b[19] == 0 else { return nil }
        self.init(generation: generation, order: [first, second],
                  a: .init(bootable: b[14] & 1 != 0, confirmed: b[14] & 2 != 0, attempts: b[16]),
                  b: .init(bootable: b[15] & 1 != 0, confirmed: b[15] & 2 != 0, attempts: b[17]))
    }
}

/// The bootloader's decision at power-on (Specs/agent.md §3.2): the side it boots
/// and, when that side is on trial, the state with one attempt spent (which it
/// writes before booting). The simulated bootloader of the tests and the crash
/// explorer is this function; a real one (GRUB, U-Boot) implements the same
/// logic over its own variables.
public enum BootLogic {
    public static func boot(_ state: BootState) -> (side: Side, spent: BootState?)? {
        for side in state.order {
            let s = state[side]
            guard s.bootable else { continue }
            if s.confirmed { return (side, nil) }
            if s.attempts > 0 {
                var next = state
                next[side].attempts -= 1
                next.generation += 1
                return (side, next)
            }
        }
        return state.confirmedSide.map { ($0, nil) }
    }
}
