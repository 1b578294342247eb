// Transport choice by measurement (issue 5): Fleetcast's POSIX driver
// (sendmmsg/recvmmsg in batches of 64, Sources/Transport) against SwiftNIO's
// DatagramChannel (vector writes and reads of 64). Each side runs in its own
// process so that time(1) gives its CPU alone; bench/sockets pairs them.
//
//   SocketBench send-posix|send-nio PORT COUNT     (to 127.0.0.1:PORT)
//   SocketBench recv-posix|recv-nio PORT           (prints datagrams received,
//                                                   stops after 1 s of silence)
import DeliveryCore
import Foundation
import NIOCore
import NIOPosix
import Transport

let size = 1428
let args = CommandLine.arguments
guard args.count >= 3, let port = Int(args[2]) else {
    FileHandle.standardError.write(Data("usage: SocketBench send-posix|send-nio PORT COUNT | recv-posix|recv-nio PORT\n".utf8))
    exit(2)
}

func sendPOSIX(count: Int) throws {
    let socket = try UDPSocket(family: .ipv4)
    _ = try socket.setBuffers(receive: 0, send: 4 << 20)
    let to = try Transport.SocketAddress(host: "127.0.0.1", port: UInt16(port))
    let batch = SendBatch()
    let datagram = [UInt8](repeating: 7, count: size)
    var sent = 0
    while sent < count {
        while !batch.isFull && sent + batch.count < count { batch.append(datagram, to: to) }
        let n = try socket.send(batch)
        batch.removeFirst(n)
        sent += n
        if n == 0 { _ = waitReadable([], until: MonotonicClock.now() + Interval(microseconds: 50)) }
    }
    print("sent \(sent)")
}

func receivePOSIX() throws {
    let socket = try UDPSocket(family: .ipv4)
    _ = try socket.setBuffers(receive: 16 << 20, send: 0)
    try socket.bind(Transport.SocketAddress(host: "127.0.0.1", port: UInt16(port)))
    var batch = ReceiveBatch()
    var count = 0
    var started = false
    while true {
        let ready = waitReadable([socket], until: MonotonicClock.now() + (started ? .seconds(1) : .seconds(30)))
        if ready.isEmpty { break }
        while try socket.receive(into: &batch) > 0 {
            started = true
            for i in 0..<batch.count where batch.datagram(i) != nil { count += 1 }
        }
    }
    print("received \(count)")
}

final class Counter: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    var count = 0
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        if envelope.data.readableBytes == size { count += 1 }
    }
}

func receiveNIO() throws {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let counter = Counter()
    let channel = try DatagramBootstrap(group: group)
        .channelOption(ChannelOptions.socketOption(.so_rcvbuf), value: 16 << 20)
        .channelOption(ChannelOptions.datagramVectorReadMessageCount, value: 64)
        .channelOption(ChannelOptions.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 64 * 2048))
        .channelInitializer { $0.pipeline.addHandler(counter) }
        .bind(host: "127.0.0.1", port: port).wait()
    var last = -1
    var waited = 0.0
    while true {
        Thread.sleep(forTimeInterval: 0.2)  // sampling the counter, not synchronisation
        let now = try channel.eventLoop.submit { counter.count }.wait()
        if now == last && now > 0 { break }
        if now == 0 { waited += 0.2; if waited > 30 { break } }
        last = now
    }
    try channel.close().wait()
    try group.syncShutdownGracefully()
    print("received \(last)")
}

func sendNIO(count: Int) throws {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let channel = try DatagramBootstrap(group: group)
        .channelOption(ChannelOptions.socketOption(.so_sndbuf), value: 4 << 20)
        .bind(host: "127.0.0.1", port: 0).wait()
    let remote = try NIOCore.SocketAddress(ipAddress: "127.0.0.1", port: port)
    var buffer = channel.allocator.buffer(capacity: size)
    buffer.writeRepeatingByte(7, count: size)
    let payload = buffer
    let done = channel.eventLoop.makePromise(of: Int.self)
    // On the event loop: 64 writes, one flush (NIO sends them with sendmmsg), then the next batch
    // once the last write of this one completed.
    func batch(_ sent: Int) {
        guard sent < count else { done.succeed(sent); return }
        let n = min(64, count - sent)
        for _ in 0..<(n - 1) { channel.write(AddressedEnvelope(remoteAddress: remote, data: payload), promise: nil) }
        channel.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: payload)).whenComplete { _ in channel.eventLoop.execute { batch(sent + n) } }  // no recursion
    }
    channel.eventLoop.execute { batch(0) }
    let sent = try done.futureResult.wait()
    try channel.close().wait()
    try group.syncShutdownGracefully()
    print("sent \(sent)")
}

switch args[1] {
case "send-posix": try sendPOSIX(count: Int(args[3])!)
case "send-nio": try sendNIO(count: Int(args[3])!)
case "recv-posix": try receivePOSIX()
case "recv-nio": try receiveNIO()
default: exit(2)
}
