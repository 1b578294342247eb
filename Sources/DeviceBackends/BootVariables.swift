import DeviceAgent

/// How a bootloader backend spells a `BootState` in environment variables
/// (Specs/agent.md §3.3, §3.4): one order variable, per side a bootable flag,
/// a trial flag and a count of trial boots left, and the generation. The grub
/// and uboot backends differ only in the names (RAUC's for each bootloader)
/// and in the count's base (U-Boot's `setexpr` works in hexadecimal). The
/// mapping is exactly invertible: `decode(encode(s)) == s`.
struct BootVariables: Sendable {
    /// `ORDER` (grub), `BOOT_ORDER` (uboot).
    let order: String
    /// What comes before `A_OK`, `A_TRY`, `A_LEFT`: "" (grub), "BOOT_" (uboot).
    let sidePrefix: String
    /// The base `<S>_LEFT` is written in.
    let leftRadix: Int

    static let generation = "FLEETCAST_GENERATION"
    /// Named limit: trial boots an environment may say are left (the agent's `trial-attempts` range).
    static let attemptsMax: UInt8 = 10

    func ok(_ side: Side) -> String { "\(sidePrefix)\(side)_OK" }
    func trial(_ side: Side) -> String { "\(sidePrefix)\(side)_TRY" }
    func left(_ side: Side) -> String { "\(sidePrefix)\(side)_LEFT" }

    /// Every variable the mapping owns; others in the environment are kept as they are.
    var owned: [String] { [order, Self.generation] + Side.allCases.flatMap { [ok($0), trial($0), left($0)] } }

    func encode(_ s: BootState) -> [String: String] {
        var vars = [order: s.order.map(\.description).joined(separator: " "), Self.generation: String(s.generation)]
        for side in Side.allCases {
            let x = s[side]
            vars[ok(side)] = x.bootable ? "1" : "0"
            vars[trial(side)] = x.confirmed ? "0" : "1"
            vars[left(side)] = String(x.attempts, radix: leftRadix)
        }
        return vars
    }

    /// A-1a, A-1b: every owned variable present with a value in its range, or an
    /// error naming the variable (`path` says where it was read).
    func decode(_ vars: [String: String], path: String) throws(StorageError) -> BootState {
        func invalid(_ key: String, _ expected: String) -> StorageError {
            StorageError("\(path): \(key) is \(vars[key].map { "'\($0)'" } ?? "missing"), not \(expected): no valid boot state")
        }
        func flag(_ key: String) throws(StorageError) -> Bool {
            switch vars[key] {
            case "1": return true
            case "0": return false
            default: throw invalid(key, "0 or 1")
            }
        }
        let words = (vars[order] ?? "").split(separator: " ", omittingEmptySubsequences: false)
        guard words.count == 2, words.allSatisfy({ $0 == "A" || $0 == "B" }), words[0] != words[1] else { throw invalid(order, "'A B' or 'B A'") }
        let sequence = words.map { Side(name: String($0))! }
        guard let g = vars[Self.generation].flatMap({ UInt64($0) }), g >= 1 else { throw invalid(Self.generation, "a generation of at least 1") }
        var sides: [BootState.SideState] = []
        let maxText = String(Self.attemptsMax, radix: leftRadix)
        for side in Side.allCases {
            guard let text = vars[left(side)], (1...maxText.count).contains(text.count), let n = UInt8(text, radix: leftRadix), n <= Self.attemptsMax else {
                throw invalid(left(side), "0 to \(maxText)\(leftRadix == 16 ? " (hexadecimal)" : "")")
            }
            sides.append(.init(bootable: try flag(ok(side)), confirmed: !(try flag(trial(side))), attempts: n))
        }
        return BootState(generation: g, order: sequence, a: sides[0], b: sides[1])
    }
}
