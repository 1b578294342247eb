import FleetCrypto
import WireFormat

/// The Merkle tree over an envelope's ANNOUNCE fragments (Specs/protocol.md P-3d).
///
/// ```
/// leaf(i)    = SHA-256(0x00 ‖ i as u16 ‖ fragment i)      for i < n
/// leaf(i)    = SHA-256(0x02)                               for n ≤ i < 2^d (padding)
/// node(l, r) = SHA-256(0x01 ‖ l ‖ r)
/// ```
///
/// with d the least depth whose 2^d leaves hold the n fragments. An ANNOUNCE carries
/// the root and its fragment's d sibling hashes, so a receiver checks every fragment
/// as it arrives and keeps only fragments of one root together: a forged fragment
/// cannot spoil the collection of a genuine envelope (issue 15, attack 4), and a
/// signed SESSION record names the root of the envelope it vouches for.
public enum EnvelopeTree {
    static let padding = SHA256.hash([0x02])

    static func leaf(_ index: Int, _ fragment: [UInt8]) -> [UInt8] {
        SHA256.hash([0x00, UInt8(index >> 8), UInt8(index & 0xFF)] + fragment)
    }

    static func node(_ left: [UInt8], _ right: [UInt8]) -> [UInt8] { SHA256.hash([0x01] + left + right) }

    /// The depth for `count` fragments.
    public static func depth(_ count: Int) -> Int {
        var d = 0
        while (1 << d) < count { d += 1 }
        return d
    }

    /// The envelope's fragments (`Announce.fragments(of:)`), each with its path, and the root.
    public static func fragments(of envelope: [UInt8]) -> (root: [UInt8], fragments: [(index: UInt16, count: UInt16, bytes: [UInt8], path: [[UInt8]])]) {
        let parts = Announce.fragments(of: envelope)
        let d = depth(parts.count)
        var level = (0..<(1 << d)).map { i in i < parts.count ? leaf(i, parts[i].bytes) : padding }
        var paths = [[[UInt8]]](repeating: [], count: parts.count)
        for _ in 0..<d {
            for i in 0..<parts.count {
                let position = i >> (paths[i].count)
                paths[i].append(level[position ^ 1])
            }
            level = stride(from: 0, to: level.count, by: 2).map { node(level[$0], level[$0 + 1]) }
        }
        return (level[0], parts.enumerated().map { i, p in (p.index, p.count, p.bytes, paths[i]) })
    }

    /// Whether the announce's fragment is at its index under its root.
    public static func verify(_ a: Announce) -> Bool {
        guard a.path.count == depth(Int(a.fragmentCount)) else { return false }
        var hash = leaf(Int(a.fragmentIndex), a.fragment)
        var position = Int(a.fragmentIndex)
        for sibling in a.path {
            hash = position & 1 == 0 ? node(hash, sibling) : node(sibling, hash)
            position >>= 1
        }
        return hash == a.root
    }
}
