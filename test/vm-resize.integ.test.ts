import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, startAgent } from "./support/agent.js";
import { clients, consoleRun, done, guestVm, isReady, MIB, until } from "./support/vm.js";

describe("resizing a running VM (vCPU and memory hotplug) on real QEMU (TCG)", () => {
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  beforeAll(async () => {
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    c = clients(agent.socket);
  });
  afterAll(async () => {
    await agent?.stop();
  });

  it("adds vCPUs and memory that the guest sees", async () => {
    const req = await guestVm("grow", { vcpus: 1, maxVcpus: 2, memoryMib: 192 });
    req.vm.spec.maxMemoryBytes = 576n * MIB;
    await done(c, await c.vms.createVm(req));
    await until(() => c.vms.getVm({ name: "vms/grow" }), isReady, 90_000, "guest ready");
    const cpus = async () =>
      Number(
        (
          await consoleRun(
            c,
            "vms/grow",
            "echo cpus=$(ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l)x",
            /cpus=(\d+)x/,
          )
        )[1],
      );
    const memKb = async () =>
      Number(
        (
          await consoleRun(
            c,
            "vms/grow",
            "echo mem=$(grep MemTotal /proc/meminfo | tr -dc 0-9)x",
            /mem=(\d+)x/,
          )
        )[1],
      );
    expect(await cpus()).toBe(1);
    const before = await memKb();

    await done(c, await c.vms.resizeVm({ name: "vms/grow", vcpus: 2, memoryBytes: 448n * MIB }));
    const vm = await c.vms.getVm({ name: "vms/grow" });
    expect(vm.spec?.vcpus).toBe(2);
    expect(vm.spec?.memoryBytes).toBe(448n * MIB);
    await until(cpus, (n) => n === 2, 20_000, "a second CPU in the guest's /sys");
    const after = await until(
      memKb,
      (kb) => kb >= before + 250 * 1024,
      20_000,
      "256 MiB more in the guest's MemTotal",
    );
    expect(after - before).toBeLessThanOrEqual(256 * 1024);

    // Beyond its maximum, or shrinking, a running VM cannot go.
    const tooMany = await c.vms.resizeVm({ name: "vms/grow", vcpus: 3 }).catch((e) => ConnectError.from(e));
    expect((tooMany as ConnectError).code).toBe(Code.InvalidArgument);
    const shrink = await c.vms.resizeVm({ name: "vms/grow", vcpus: 1 }).catch((e) => ConnectError.from(e));
    expect((shrink as ConnectError).code).toBe(Code.FailedPrecondition);
  });
});
