import FleetCrypto
import Testing

private func hex(_ s: String) -> [UInt8] { [UInt8](hex: s.filter { !$0.isWhitespace })! }

@Suite("Known-answer vectors")
struct KnownAnswerTests {
    @Test("SHA-256 FIPS 180-4 examples, one-shot and streaming")
    func sha256() {
        #expect(SHA256.hash(Array("abc".utf8)) == hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"))
        #expect(SHA256.hash([]) == hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"))
        let message = Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)
        var streaming = SHA256()
        for byte in message { streaming.update([byte]) }
        let expected = hex("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(streaming.finalize() == expected)
        // finalize() resets: the context is reusable.
        streaming.update(message)
        #expect(streaming.finalize() == expected)
    }

    @Test("Ed25519 RFC 8032 §7.1 test 1 and 2")
    func ed25519() throws {
        let key = try PrivateKey(raw: hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"), algorithm: .ed25519)
        #expect(key.publicKey.raw == hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"))
        let signature = try key.sign([])
        #expect(signature == hex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"))
        #expect(key.publicKey.verify(signature: signature, for: []))
        #expect(!key.publicKey.verify(signature: signature, for: [0]))

        let key2 = try PrivateKey(raw: hex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"), algorithm: .ed25519)
        #expect(try key2.sign([0x72]) == hex("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"))
    }

    @Test("ECDSA P-256 RFC 6979 §A.2.5 signature verifies; ours round-trips")
    func p256() throws {
        let key = try PrivateKey(raw: hex("C9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721"), algorithm: .p256)
        let point = hex("04 60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6 7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299")
        #expect(key.publicKey.raw == point)
        let rfcSignature = hex("EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716 F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8")
        let publicKey = try PublicKey(raw: point, algorithm: .p256)
        #expect(publicKey.verify(signature: rfcSignature, for: Array("sample".utf8)))
        #expect(!publicKey.verify(signature: rfcSignature, for: Array("samplf".utf8)))
        var flipped = rfcSignature
        flipped[63] ^= 1
        #expect(!publicKey.verify(signature: flipped, for: Array("sample".utf8)))
        let ours = try key.sign(Array("sample".utf8))
        #expect(ours.count == 64)
        #expect(publicKey.verify(signature: ours, for: Array("sample".utf8)))
    }

    @Test("X25519 RFC 7748 §6.1")
    func x25519() throws {
        let alice = try PrivateKey(raw: hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"), algorithm: .x25519)
        let bob = try PrivateKey(raw: hex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"), algorithm: .x25519)
        #expect(alice.publicKey.raw == hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"))
        #expect(bob.publicKey.raw == hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"))
        let shared = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        #expect(try alice.sharedSecret(with: bob.publicKey) == shared)
        #expect(try bob.sharedSecret(with: alice.publicKey) == shared)
    }

    @Test("ECDH P-256 RFC 5903 §8.1")
    func ecdhP256() throws {
        let i = try PrivateKey(raw: hex("C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433"), algorithm: .p256)
        let r = try PrivateKey(raw: hex("C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53"), algorithm: .p256)
        #expect(i.publicKey.raw == hex("04 DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180 5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3"))
        let expected = hex("D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE")
        #expect(try i.sharedSecret(with: r.publicKey) == expected)
        #expect(try r.sharedSecret(with: i.publicKey) == expected)
    }

    @Test("HKDF-SHA256 RFC 5869 A.1")
    func hkdf() throws {
        let okm = try HKDF.sha256(inputKeyMaterial: [UInt8](repeating: 0x0b, count: 22),
                                  salt: hex("000102030405060708090a0b0c"), info: hex("f0f1f2f3f4f5f6f7f8f9"), outputByteCount: 42)
        #expect(okm == hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"))
    }

    @Test("HMAC-SHA256 RFC 4231 test cases 1 and 2")
    func hmac() {
        #expect(HMAC.sha256(key: [UInt8](repeating: 0x0b, count: 20), message: Array("Hi There".utf8))
                == hex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"))
        #expect(HMAC.sha256(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8))
                == hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"))
    }

    @Test("AES key wrap RFC 3394 §4.3 and §4.6")
    func keyWrap() throws {
        let kek = hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
        let k128 = hex("00112233445566778899AABBCCDDEEFF")
        #expect(try AESKeyWrap.wrap(key: k128, kek: kek) == hex("64E8C3F9CE0F5BA263E9777905818A2A93C8191E7D6E8AE7"))
        let k256 = hex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
        let wrapped = try AESKeyWrap.wrap(key: k256, kek: kek)
        #expect(wrapped == hex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"))
        #expect(try AESKeyWrap.unwrap(wrapped, kek: kek) == k256)
        var tampered = wrapped
        tampered[3] ^= 0x10
        #expect(throws: CryptoError(.authenticationFailed, "")) { try AESKeyWrap.unwrap(tampered, kek: kek) }
        var otherKEK = kek
        otherKEK[0] ^= 1
        #expect(throws: CryptoError(.authenticationFailed, "")) { try AESKeyWrap.unwrap(wrapped, kek: otherKEK) }
    }

    @Test("AES-256-GCM: GCM spec test cases 13 and 16")
    func gcm() throws {
        let zero = try AES256GCM(key: [UInt8](repeating: 0, count: 32))
        #expect(try zero.seal([], nonce: [UInt8](repeating: 0, count: 12)) == hex("530f8afbc74536b9a963b4f1c4cb738b"))

        let cipher = try AES256GCM(key: hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308"))
        let nonce = hex("cafebabefacedbaddecaf888")
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
        let plaintext = hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
        let sealed = try cipher.seal(plaintext, nonce: nonce, aad: aad)
        #expect(sealed == hex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662") + hex("76fc6ece0f4e1768cddf8853bb2d551b"))
        #expect(try cipher.open(sealed, nonce: nonce, aad: aad) == plaintext)
        var bad = sealed
        bad[5] ^= 1
        #expect(throws: CryptoError(.authenticationFailed, "")) { try cipher.open(bad, nonce: nonce, aad: aad) }
        #expect(throws: CryptoError(.authenticationFailed, "")) { try cipher.open(sealed, nonce: nonce, aad: [1]) }
        #expect(throws: CryptoError(.authenticationFailed, "")) { try cipher.open(Array(sealed.prefix(10)), nonce: nonce, aad: aad) }
    }
}

@Suite("Keys")
struct KeyTests {
    @Test("PEM round trip and key IDs for every algorithm", arguments: KeyAlgorithm.allCases)
    func pemRoundTrip(algorithm: KeyAlgorithm) throws {
        let key = try PrivateKey.generate(algorithm)
        let reloaded = try PrivateKey(pem: key.pemPKCS8())
        #expect(reloaded.publicKey == key.publicKey)
        let publicPEM = try key.publicKey.pem()
        #expect(publicPEM.hasPrefix("-----BEGIN PUBLIC KEY-----"))
        let publicKey = try PublicKey(pem: publicPEM)
        #expect(publicKey == key.publicKey)
        #expect(publicKey.keyID == key.publicKey.keyID)
        #expect(publicKey.keyID.count == 8)
        if algorithm.canSign {
            let message = Array("fleetcast".utf8)
            #expect(publicKey.verify(signature: try reloaded.sign(message), for: message))
            let other = try PrivateKey.generate(algorithm)
            #expect(!other.publicKey.verify(signature: try reloaded.sign(message), for: message))
        }
    }

    @Test("Malformed key material is rejected with a reason")
    func malformed() throws {
        #expect(throws: CryptoError(.invalidKey, "")) { try PrivateKey(pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n") }
        #expect(throws: CryptoError(.invalidKey, "")) { try PublicKey(pem: "not a key") }
        #expect(throws: CryptoError(.invalidLength, "")) { try PublicKey(raw: [1, 2, 3], algorithm: .ed25519) }
        var notOnCurve = [UInt8](repeating: 7, count: 65)
        notOnCurve[0] = 4
        #expect(throws: CryptoError(.invalidKey, "")) { try PublicKey(raw: notOnCurve, algorithm: .p256) }
        let signing = try PrivateKey.generate(.ed25519)
        let agreeing = try PrivateKey.generate(.x25519)
        #expect(throws: CryptoError(.wrongAlgorithm, "")) { try signing.sharedSecret(with: agreeing.publicKey) }
        #expect(throws: CryptoError(.wrongAlgorithm, "")) { try agreeing.sign([1]) }
    }
}
