import Testing
import TidemarkServer

@Suite("Chain export specifications: backup:PATH[@POINT][:rw]")
struct ChainExportSpecificationTests {
    @Test("path, point and mode are taken apart; @ inside a directory name stays in the path")
    func parses() throws {
        #expect(try ChainExportSpecification(parsing: "backup:/b/vm") == .init(path: "/b/vm", point: nil, writable: false))
        #expect(try ChainExportSpecification(parsing: "backup:/b/vm@3") == .init(path: "/b/vm", point: "3", writable: false))
        #expect(try ChainExportSpecification(parsing: "backup:/b/vm@c2:rw") == .init(path: "/b/vm", point: "c2", writable: true))
        #expect(try ChainExportSpecification(parsing: "backup:/b/vm:ro") == .init(path: "/b/vm", point: nil, writable: false))
        #expect(try ChainExportSpecification(parsing: "backup:/x@y/vm:rw") == .init(path: "/x@y/vm", point: nil, writable: true))
        #expect(try ChainExportSpecification(parsing: "backup:top.qcow2") == .init(path: "top.qcow2", point: nil, writable: false))
    }

    @Test("an empty path or point, or no prefix, is refused with the expected form")
    func refuses() {
        for text in ["backup:", "backup:@2", "backup:/b/vm@", "/b/vm"] {
            #expect(throws: ServerError.self, "\(text)") { try ChainExportSpecification(parsing: text) }
        }
    }
}
