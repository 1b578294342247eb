// The fuzz target for the manifest and bundle parsers.
//
// Built by scripts/fuzz with `-sanitize=fuzzer,address -DFUZZING -parse-as-library`,
// libFuzzer provides `main` and calls LLVMFuzzerTestOneInput. In a plain build this
// file is a small tool instead:
//   FuzzBundle seeds DIR     write the seed corpus into DIR
//   FuzzBundle FILE...       replay inputs (e.g. a crasher) through the harness
import UpdateBundle
#if canImport(Glibc)
import Glibc
#endif

#if FUZZING
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    ParserHarness.exercise(size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

public typealias FuzzArgv = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<FuzzArgv>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// SwiftPM links an executable's entry point as `<module>_main`; hand control to libFuzzer's driver.
@_cdecl("FuzzBundle_main")
public func fuzzMain(_ argc: CInt, _ argv: FuzzArgv) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv, fuzzOne)
}
#else
func readFile(_ path: String) -> [UInt8]? {
    guard let f = fopen(path, "rb") else { return nil }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = fread(&buffer, 1, buffer.count, f)
        if n == 0 { break }
        out += buffer[0..<n]
    }
    return out
}

@main
struct FuzzBundleTool {
    static func main() throws {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if arguments.first == "seeds", arguments.count == 2 {
            for (name, bytes) in try ParserHarness.seeds() {
                let f = fopen(arguments[1] + "/" + name, "wb")!
                fwrite(bytes, 1, bytes.count, f)
                fclose(f)
            }
            print("wrote \(try ParserHarness.seeds().count) seeds to \(arguments[1])")
        } else if arguments.isEmpty || arguments.first == "--help" {
            print("usage: FuzzBundle seeds DIR | FuzzBundle FILE...   (fuzzing: scripts/fuzz)")
        } else {
            for path in arguments {
                guard let bytes = readFile(path) else { print("cannot read \(path)"); exit(1) }
                ParserHarness.exercise(bytes)
                print("ok \(path) (\(bytes.count) bytes)")
            }
        }
    }
}
#endif
