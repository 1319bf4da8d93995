import Testing
@testable import TidemarkBackup

/// The cluster rounding rules of a backup plan: data rounds outward, zeroes inward,
/// partial zero clusters become data, data wins where both meet, the short last cluster.
@Suite("Backup: plan")
struct BackupPlanTests {
    static let cluster: UInt64 = 65536
    static let size: UInt64 = 16 * cluster

    @Test("a 4 KiB data range is copied as its whole 64 KiB cluster")
    func dataRoundsOutward() {
        var plan = BackupPlan(virtualSize: Self.size)
        plan.addData(offset: Self.cluster + 4096, length: 4096)
        #expect(plan.runs == [BackupPlan.Run(Self.cluster, 2 * Self.cluster, .copy)])
    }

    @Test("a zero range becomes zero clusters where it covers them whole, data at partial edges")
    func zeroRoundsInward() {
        var plan = BackupPlan(virtualSize: Self.size)
        plan.addZero(offset: Self.cluster / 2, length: 3 * Self.cluster)
        #expect(plan.runs == [
            BackupPlan.Run(0, Self.cluster, .copy),
            BackupPlan.Run(Self.cluster, 3 * Self.cluster, .zero),
            BackupPlan.Run(3 * Self.cluster, 4 * Self.cluster, .copy),
        ])
    }

    @Test("a zero range inside one cluster makes that cluster data")
    func smallZeroIsData() {
        var plan = BackupPlan(virtualSize: Self.size)
        plan.addZero(offset: 2 * Self.cluster + 512, length: 4096)
        #expect(plan.runs == [BackupPlan.Run(2 * Self.cluster, 3 * Self.cluster, .copy)])
    }

    @Test("data then zero in the same cluster: the cluster is data, the rest zero")
    func dataWinsAtTheSeam() {
        var plan = BackupPlan(virtualSize: Self.size)
        plan.addData(offset: 0, length: 4096)
        plan.addZero(offset: 4096, length: 2 * Self.cluster - 4096)
        plan.addData(offset: 2 * Self.cluster, length: 512)
        #expect(plan.runs == [
            BackupPlan.Run(0, Self.cluster, .copy),
            BackupPlan.Run(Self.cluster, 2 * Self.cluster, .zero),
            BackupPlan.Run(2 * Self.cluster, 3 * Self.cluster, .copy),
        ])
        #expect(plan.bytesToCopy == 2 * Self.cluster && plan.bytesToZero == Self.cluster)
    }

    @Test("zero then data sharing a cluster: the shared cluster is data")
    func zeroThenDataShareACluster() {
        var plan = BackupPlan(virtualSize: Self.size)
        plan.addZero(offset: 0, length: Self.cluster + 4096)
        plan.addData(offset: Self.cluster + 4096, length: 4096)
        #expect(plan.runs == [BackupPlan.Run(0, Self.cluster, .zero), BackupPlan.Run(Self.cluster, 2 * Self.cluster, .copy)])
    }

    @Test("the short last cluster: zero to the end is a zero cluster, data is clipped to the size")
    func shortLastCluster() {
        let size = 3 * Self.cluster + 512
        var plan = BackupPlan(virtualSize: size)
        plan.addZero(offset: 3 * Self.cluster, length: 512)
        #expect(plan.runs == [BackupPlan.Run(3 * Self.cluster, size, .zero)])
        var data = BackupPlan(virtualSize: size)
        data.addData(offset: size - 100, length: 100)
        #expect(data.runs == [BackupPlan.Run(3 * Self.cluster, size, .copy)])
    }

    @Test("neighbouring runs merge; requests are cut at request-size boundaries")
    func requests() {
        var plan = BackupPlan(virtualSize: Self.size)
        plan.addData(offset: 0, length: 3 * Self.cluster)
        plan.addData(offset: 3 * Self.cluster, length: 2 * Self.cluster)
        #expect(plan.runs == [BackupPlan.Run(0, 5 * Self.cluster, .copy)])
        let requests = plan.copyRequests(requestSize: 2 * Self.cluster)
        #expect(requests.map(\.offset) == [0, 2 * Self.cluster, 4 * Self.cluster])
        #expect(requests.map(\.length) == [2 * Self.cluster, 2 * Self.cluster, Self.cluster])
    }
}
