import { describe, expect, it } from "vitest";
import { MIB } from "../domain.js";
import type { LaunchRequest } from "../driver.js";
import { chArgs, chFiles, chLaunchSpec, vmName } from "./cmdline.js";
import { buildVmConfig } from "./config.js";
import { loadChOpenApi } from "./testing/openapi.js";

describe("the launch", () => {
  const paths = {
    dir: "/var/lib/vmenv/vms/web-1",
    record: "/var/lib/vmenv/vms/web-1/vm.json",
    control: "/var/lib/vmenv/vms/web-1/api.sock",
    serialSocket: "/var/lib/vmenv/vms/web-1/serial.sock",
    serialLog: "/var/lib/vmenv/vms/web-1/serial.log",
    pidFile: "/var/lib/vmenv/vms/web-1/vmm.pid",
  };
  const req: LaunchRequest = {
    id: "web-1",
    accelerator: "kvm",
    paused: false,
    disks: [],
    nics: [],
    paths,
    spec: {
      vmm: "cloud-hypervisor",
      accelerator: undefined,
      vcpus: 1,
      maxVcpus: 1,
      memoryBytes: 256n * MIB,
      maxMemoryBytes: 256n * MIB,
      hostCpus: [],
      boot: { kind: "kernel", kernelPath: "/k", initrdPath: undefined, cmdline: "console=ttyS0 quiet" },
    },
  };

  it("maps a small spec to a valid vm.create body: no hotplug room, no pinning, no initramfs", () => {
    const body = buildVmConfig(chLaunchSpec(req, chFiles(paths)));
    expect(body).toEqual({
      cpus: { boot_vcpus: 1, max_vcpus: 1 },
      memory: { size: 256 * 1024 * 1024 },
      payload: { kernel: "/k", cmdline: "console=ttyS0 quiet" },
      serial: { mode: "Socket", socket: "/var/lib/vmenv/vms/web-1/ch-serial.sock" },
      console: { mode: "Off" },
    });
    expect(loadChOpenApi().validate("VmConfig", body, "closed")).toEqual([]);
    expect(vmName(paths)).toBe("vms/web-1");
  });

  it("refuses a folder whose path cloud-hypervisor's option syntax cannot carry", () => {
    const files = chFiles({
      ...paths,
      dir: "/var/lib/a,b/vms/web-1",
      control: "/var/lib/a,b/vms/web-1/api.sock",
    });
    expect(() => chArgs("vms/web-1", files)).toThrow(
      /cloud-hypervisor did not start vms\/web-1: its folder's path/,
    );
    expect(chArgs("vms/web-1", chFiles(paths))).toEqual([
      "--api-socket",
      "path=/var/lib/vmenv/vms/web-1/api.sock",
      "--event-monitor",
      "path=/var/lib/vmenv/vms/web-1/ch-events.json",
    ]);
  });
});
