import Foundation
import NBDClient
import Testing
import QMPWire

/// The control socket with the real QMP client: QEMU's `qemu.qmp` Python package (async
/// and legacy APIs) and its `qmp-shell`, run by `/usr/bin/python3` (installed by
/// scripts/setup; missing is a failure).
@Suite("Control: qemu.qmp and qmp-shell")
struct ControlPythonTests {
    static let asyncScript = #"""
        import asyncio, json, sys
        from qemu.qmp import QMPClient, ExecuteError

        async def main(sock):
            out = {}
            qmp = QMPClient('tidemark-test')
            await qmp.connect(sock)
            v = qmp.greeting.QMP.version
            out['greeting'] = {'major': v['qemu']['major'], 'minor': v['qemu']['minor'], 'micro': v['qemu']['micro'],
                               'package': v['package'], 'capabilities': list(qmp.greeting.QMP.capabilities)}
            out['version'] = await qmp.execute('query-version')
            out['add'] = await qmp.execute('block-dirty-bitmap-add',
                                           {'node': 'disk', 'name': 'b0', 'granularity': 65536, 'persistent': True})
            await qmp.execute('block-dirty-bitmap-add', {'node': 'disk', 'name': 'b1', 'disabled': True})
            out['exports'] = await qmp.execute('query-block-exports')
            out['nodes'] = await qmp.execute('query-named-block-nodes')
            out['transaction'] = await qmp.execute('transaction', {'actions': [
                {'type': 'block-dirty-bitmap-add', 'data': {'node': 'disk', 'name': 'b2', 'granularity': 4096}},
                {'type': 'block-dirty-bitmap-merge', 'data': {'node': 'disk', 'target': 'b1', 'bitmaps': ['b0']}},
                {'type': 'block-dirty-bitmap-disable', 'data': {'node': 'disk', 'name': 'b0'}},
            ]})
            errors = {}
            for key, cmd, args in [
                ('abort', 'transaction', {'actions': [
                    {'type': 'block-dirty-bitmap-clear', 'data': {'node': 'disk', 'name': 'b1'}},
                    {'type': 'abort', 'data': {}}]}),
                ('missing', 'block-dirty-bitmap-remove', {'node': 'disk', 'name': 'missing'}),
                ('unknown', 'no-such-command', None),
                ('type', 'block-dirty-bitmap-add', {'node': 'disk', 'name': 'x', 'granularity': 'big'}),
            ]:
                try:
                    await qmp.execute(cmd, args)
                    errors[key] = None
                except ExecuteError as err:
                    errors[key] = {'class': err.error_class, 'desc': err.error.error.desc}
            out['errors'] = errors
            out['after'] = await qmp.execute('query-named-block-nodes')
            with qmp.listener('CHECKPOINT_CREATED') as listener:
                out['checkpoint'] = await qmp.execute('checkpoint-create', {'node': 'disk', 'bitmap': 'b0'})
                event = await asyncio.wait_for(listener.get(), 10)
            out['created'] = {'event': event['event'], 'data': dict(event['data']),
                              'timestamp': dict(event['timestamp'])}
            with qmp.listener(('CHECKPOINT_COMPLETED', 'CHECKPOINT_ABORTED')) as listener:
                await qmp.execute('checkpoint-abort', {'node': 'disk', 'name': out['checkpoint']['name']})
                event = await asyncio.wait_for(listener.get(), 10)
            out['aborted'] = {'event': event['event'], 'data': dict(event['data'])}
            out['final'] = await qmp.execute('query-named-block-nodes')
            await qmp.disconnect()
            print(json.dumps(out))

        asyncio.run(main(sys.argv[1]))
        """#

    static let legacyScript = #"""
        import json, sys
        from qemu.qmp.legacy import QEMUMonitorProtocol

        qmp = QEMUMonitorProtocol(sys.argv[1])
        greeting = qmp.connect(negotiate=True)
        out = {'greeting': greeting}
        out['add'] = qmp.cmd_raw('block-dirty-bitmap-add', {'node': 'disk', 'name': 'legacy'})
        out['missing'] = qmp.cmd_raw('block-dirty-bitmap-clear', {'node': 'disk', 'name': 'missing'})
        out['created'] = qmp.cmd('checkpoint-create', node='disk', bitmap='legacy', timeout=30)
        out['checkpoints'] = qmp.cmd('query-checkpoints')
        qmp.close()
        print(json.dumps(out))
        """#

    static func output(_ result: ToolResult) throws -> QMPJSON {
        guard result.succeeded else { throw HarnessError("python failed: \(result)") }
        guard let line = result.stdout.split(separator: "\n").last else { throw HarnessError("no output: \(result)") }
        return try QMPJSON.parse(String(line))
    }

    @Test("qemu.qmp QMPClient: greeting, add, queries, transaction, errors, CHECKPOINT_CREATED event")
    func asyncClient() throws {
        try ControlPrograms.requireQEMUQMP()
        let fixture = try ControlFixture()
        let observer = try fixture.qmp()
        // Data written before the bitmap exists is not recorded; after, it is.
        try fixture.write([(0, 4096)])
        let out = try Self.output(try ControlPrograms.python(script: Self.asyncScript, [fixture.controlPath]))

        #expect(out["greeting"]?["package"] == "tidemark")
        #expect(out["greeting"]?["capabilities"] == [])
        #expect(out["version"]?["qemu"]?["major"] == out["greeting"]?["major"])
        #expect(out["add"] == [:])
        #expect(out["exports"] == [["id": "disk", "type": "nbd", "node-name": "disk", "shutting-down": false]])
        let bitmaps = out["nodes"]?[0]?["dirty-bitmaps"]
        #expect(bitmaps?[0] == [
            "name": "b0", "count": 0, "granularity": 65536, "recording": true, "busy": false, "persistent": true, "generation": 0,
        ])
        #expect(bitmaps?[1]?["recording"] == false)
        #expect(out["transaction"] == [:])
        #expect(out["errors"]?["abort"] == ["class": "GenericError", "desc": "Transaction aborted using Abort action"])
        #expect(out["errors"]?["missing"] == ["class": "GenericError", "desc": "bitmap 'missing' not found"])
        #expect(out["errors"]?["unknown"] == ["class": "CommandNotFound", "desc": "The command no-such-command has not been found"])
        #expect(out["errors"]?["type"]?["class"] == "GenericError")
        let after = out["after"]?[0]?["dirty-bitmaps"]?.arrayValue ?? []
        #expect(after.map { $0["name"] } == ["b0", "b1", "b2"])
        #expect(after.first { $0["name"] == "b0" }?["recording"] == false, "the transaction disabled b0")
        #expect(after.first { $0["name"] == "b2" }?["granularity"] == 4096)

        #expect(out["checkpoint"]?.removing(JSONValue.lineageKeys) == ["name": "c1", "bitmap": "b0", "count": 0])
        #expect(out["checkpoint"]?["id"]?.isCheckpointID == true && out["checkpoint"]?["base"] == .null)
        #expect(out["created"]?["event"] == "CHECKPOINT_CREATED")
        #expect(out["created"]?["data"] == ["node": "disk", "name": "c1", "bitmap": "b0", "consume": false])
        #expect(out["created"]?["timestamp"]?["seconds"]?.intValue != nil)
        #expect(out["aborted"] == ["event": "CHECKPOINT_ABORTED", "data": ["node": "disk", "name": "c1", "reason": "requested"]])
        #expect(out["final"]?[0]?["dirty-bitmaps"]?.arrayValue?.map { $0["name"] } == ["b0", "b1", "b2"])
        // What Python did is what a raw client sees.
        #expect(Set(try ControlFixture.bitmaps(observer).keys) == ["b0", "b1", "b2"])
    }

    @Test("qemu.qmp legacy QEMUMonitorProtocol (the synchronous API iotests use)")
    func legacyClient() throws {
        try ControlPrograms.requireQEMUQMP()
        let fixture = try ControlFixture()
        let out = try Self.output(try ControlPrograms.python(script: Self.legacyScript, [fixture.controlPath]))
        #expect(out["greeting"]?["QMP"]?["capabilities"] == [])
        #expect(out["add"] == ["return": [:]])
        #expect(out["missing"] == ["error": ["class": "GenericError", "desc": "bitmap 'missing' not found"]])
        #expect(out["created"]?.removing(JSONValue.lineageKeys) == ["name": "c1", "bitmap": "legacy", "count": 0])
        #expect(out["checkpoints"]?.removing(JSONValue.lineageKeys) == [["node": "disk", "name": "c1", "bitmap": "legacy", "count": 0]])
        #expect(out["checkpoints"]?[0]?["id"] == out["created"]?["id"])
    }

    @Test("qmp-shell driven through stdin: commands, a transaction, an error, a checkpoint")
    func qmpShell() throws {
        try ControlPrograms.requireQEMUQMP()
        let fixture = try ControlFixture()
        try fixture.write([(1 << 20, 4096)])
        let input = """
            block-dirty-bitmap-add node=disk name=s0 granularity=65536
            query-block-exports
            transaction(
            block-dirty-bitmap-add node=disk name=s1 granularity=4096
            block-dirty-bitmap-disable node=disk name=s0
            )
            block-dirty-bitmap-remove node=disk name=missing
            checkpoint-create node=disk bitmap=s1 name=shell-ck
            query-checkpoints

            """
        let result = try ControlPrograms.run(
            ControlPrograms.python, ["-m", "qemu.qmp.qmp_shell", fixture.controlPath], stdin: input, timeout: 60)
        #expect(result.succeeded, "\(result)")
        #expect(result.stdout.contains("Connected to QEMU"), "\(result.stdout)")
        // Replies are printed one per line after the prompt.
        var replies: [QMPJSON] = []
        for line in result.stdout.split(separator: "\n") {
            var text = Substring(line)
            while true {
                if text.hasPrefix("(QEMU) ") { text = text.dropFirst(7) } else if text.hasPrefix("TRANS> ") { text = text.dropFirst(7) } else { break }
            }
            if text.hasPrefix("{") { replies.append(try QMPJSON.parse(String(text))) }
        }
        #expect(replies.count == 6, "\(result.stdout)")
        guard replies.count == 6 else { return }
        #expect(replies[0] == ["return": [:]])
        #expect(replies[1]["return"]?[0]?["id"] == "disk")
        #expect(replies[2] == ["return": [:]], "transaction")
        #expect(replies[3] == ["error": ["class": "GenericError", "desc": "bitmap 'missing' not found"]])
        #expect(replies[4]["return"]?.removing(JSONValue.lineageKeys) == ["name": "shell-ck", "bitmap": "s1", "count": 0])
        #expect(replies[5]["return"]?[0]?["name"] == "shell-ck")
        // qmp-shell has exited: its checkpoint (abort-on-disconnect, 60 s default) is still pending.
        let client = try fixture.qmp()
        let bitmaps = try ControlFixture.bitmaps(client)
        #expect(Set(bitmaps.keys) == ["s0", "s1", "shell-ck"])
        #expect(bitmaps["s0"]?["recording"] == false)
    }
}
