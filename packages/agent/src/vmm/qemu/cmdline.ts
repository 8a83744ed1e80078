import { MIB } from "../domain.js";
import { type AttachedDisk, type AttachedGpu, HOTPLUG_SLOTS, type LaunchRequest } from "../driver.js";

/**
 * The QEMU command line of a VM. Pure: the same request gives the same arguments. The process
 * daemonizes (so it outlives the agent and is nobody's child), writes its pid file, serves QMP and the
 * serial console on Unix sockets in the VM's folder and logs the console to a file.
 */
export function qemuArgs(req: LaunchRequest): string[] {
  // QEMU option values end at a comma; a comma inside a value is written twice.
  const v = (s: string) => s.replaceAll(",", ",,");
  const { spec, paths, accelerator } = req;
  const memMib = spec.memoryBytes / MIB;
  const maxMib = spec.maxMemoryBytes / MIB;
  // Under TCG, QEMU before 9.0 loses the guest's writes made after a migration dirty-bitmap sync when the
  // RAM block is a whole number of 256 KiB (docs/adr/0015); 8 KiB more takes its per-page path instead.
  const ram = accelerator === "kvm" ? `${memMib}M` : `${memMib * 1024n + 8n}K`;
  const args = [
    "-name",
    `guest=${req.id},process=vmenv-${req.id},debug-threads=on`,
    // Guest RAM is a shared memfd, so that vhost-user backends (a storage daemon's vhost-user-blk
    // export) can map it; hot-plugged DIMMs are shared memfds too.
    "-object",
    `memory-backend-memfd,id=mem,size=${ram},share=on`,
    "-machine",
    `q35,accel=${accelerator},memory-backend=mem`,
    "-cpu",
    accelerator === "kvm" ? "host" : "max",
    "-smp",
    `${spec.vcpus},maxcpus=${spec.maxVcpus}`,
    "-m",
    maxMib > memMib ? `${ram},slots=8,maxmem=${maxMib}M` : ram,
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-vga",
    "none",
    "-chardev",
    `socket,id=qmp,path=${v(paths.control)},server=on,wait=off`,
    "-mon",
    "chardev=qmp,mode=control",
    "-chardev",
    `socket,id=serial0,path=${v(paths.serialSocket)},server=on,wait=off,logfile=${v(paths.serialLog)},logappend=on`,
    "-serial",
    "chardev:serial0",
    "-pidfile",
    paths.pidFile,
    "-daemonize",
  ];
  for (let i = 0; i < HOTPLUG_SLOTS; i++) {
    args.push(
      "-device",
      `pcie-root-port,id=rp${i},chassis=${i + 1},bus=pcie.0,addr=${(0x10 + i).toString(16)}`,
    );
  }
  for (const d of req.disks) args.push(...diskArgs(d, v));
  for (const n of req.nics) {
    args.push("-netdev", `tap,id=n-${n.id},ifname=${n.tap},script=no,downscript=no`);
    args.push("-device", `virtio-net-pci,id=nic-${n.id},netdev=n-${n.id},mac=${n.mac},bus=rp${n.slot}`);
  }
  for (const g of req.gpus ?? []) {
    for (const d of gpuObjects(g))
      args.push(
        "-device",
        Object.entries(d)
          .map(([k, x]) => (k === "driver" ? x : `${k}=${x}`))
          .join(","),
      );
  }
  if (spec.boot.kind === "kernel") {
    args.push("-kernel", spec.boot.kernelPath);
    if (spec.boot.initrdPath) args.push("-initrd", spec.boot.initrdPath);
    args.push("-append", spec.boot.cmdline);
  }
  if (req.paused || req.incoming) args.push("-S");
  if (req.incoming) args.push("-incoming", req.incoming === "defer" ? "defer" : `unix:${req.incoming}`);
  return args;
}

/**
 * QEMU objects of one disk served by a storage daemon: a vhost-user-blk device on a socket chardev
 * (reconnecting when the daemon restarts), or a virtio-blk device on an NBD client node.
 */
export function exportedDiskObjects(d: AttachedDisk) {
  const e = d.export;
  if (!e) return undefined;
  if (e.kind === "vhost-user-blk") {
    return {
      kind: e.kind,
      chardev: {
        id: `c-${d.id}`,
        backend: {
          type: "socket",
          data: { addr: { type: "unix", data: { path: e.socket } }, server: false, reconnect: 1 },
        },
      },
      device: {
        driver: "vhost-user-blk-pci",
        id: `disk-${d.id}`,
        chardev: `c-${d.id}`,
        bus: `rp${d.slot}`,
        "num-queues": 1,
      },
    } as const;
  }
  return {
    kind: e.kind,
    node: {
      driver: "nbd",
      "node-name": `d-${d.id}`,
      server: { type: "unix", path: e.socket },
      export: e.exportName,
      "read-only": d.readOnly,
      "reconnect-delay": 10,
    },
    device: {
      driver: "virtio-blk-pci",
      id: `disk-${d.id}`,
      drive: `d-${d.id}`,
      bus: `rp${d.slot}`,
      ...(d.serial ? { serial: d.serial } : {}),
    },
  } as const;
}

/**
 * The vfio-pci devices of one GPU, behind its root port: function 0 (the GPU) at slot address 0.0 and
 * its other functions (HDMI audio) at 0.N of the same slot, so the guest sees one multi-function device
 * as on the host. Listed in hot-plug order: the other functions first, function 0 last (adding
 * function 0 is what makes the guest see the slot).
 */
export function gpuObjects(g: AttachedGpu): Record<string, string>[] {
  const multi = g.functions.length > 0;
  const others = g.functions.map((f) => ({
    driver: "vfio-pci",
    host: f,
    id: `gpu-${g.id}-f${f.slice(-1)}`,
    bus: `rp${g.slot}`,
    addr: `00.${f.slice(-1)}`,
  }));
  return [
    ...others,
    {
      driver: "vfio-pci",
      host: g.host,
      id: `gpu-${g.id}`,
      bus: `rp${g.slot}`,
      addr: "00.0",
      ...(multi ? { multifunction: "on" } : {}),
    },
  ];
}

/**
 * Hot-plugs a GPU over QMP: `device_add` of each vfio-pci function, function 0 last. When one fails, the
 * functions already added are deleted again, so nothing of the GPU stays in the VM.
 */
export async function hotplugGpu(
  execute: (command: string, args: Record<string, unknown>) => Promise<unknown>,
  g: AttachedGpu,
): Promise<void> {
  const added: string[] = [];
  try {
    for (const d of gpuObjects(g)) {
      await execute("device_add", d);
      added.push(d.id as string);
    }
  } catch (e) {
    for (const id of added.reverse()) await execute("device_del", { id }).catch(() => undefined);
    throw e;
  }
}

/** QEMU objects of one disk: a file node, a format node on it, a virtio-blk device behind its root port. */
export function diskObjects(d: AttachedDisk) {
  const ro = d.readOnly ? "on" : "off";
  return {
    file: { driver: "file", filename: d.path, "node-name": `f-${d.id}`, "read-only": d.readOnly },
    format: { driver: d.format, file: `f-${d.id}`, "node-name": `d-${d.id}`, "read-only": d.readOnly },
    device: {
      driver: "virtio-blk-pci",
      id: `disk-${d.id}`,
      drive: `d-${d.id}`,
      bus: `rp${d.slot}`,
      ...(d.serial ? { serial: d.serial } : {}),
    },
    ro,
  };
}

function diskArgs(d: AttachedDisk, v: (s: string) => string): string[] {
  if (d.export?.kind === "vhost-user-blk") {
    return [
      "-chardev",
      `socket,id=c-${d.id},path=${v(d.export.socket)},reconnect=1`,
      "-device",
      `vhost-user-blk-pci,id=disk-${d.id},chardev=c-${d.id},bus=rp${d.slot},num-queues=1`,
    ];
  }
  if (d.export?.kind === "nbd") {
    const ro = d.readOnly ? "on" : "off";
    return [
      "-blockdev",
      `driver=nbd,node-name=d-${d.id},server.type=unix,server.path=${v(d.export.socket)},export=${v(d.export.exportName)},read-only=${ro},reconnect-delay=10`,
      "-device",
      `virtio-blk-pci,id=disk-${d.id},drive=d-${d.id},bus=rp${d.slot}${d.serial ? `,serial=${v(d.serial)}` : ""}`,
    ];
  }
  const o = diskObjects(d);
  return [
    "-blockdev",
    `driver=file,filename=${v(d.path)},node-name=f-${d.id},read-only=${o.ro}`,
    "-blockdev",
    `driver=${d.format},file=f-${d.id},node-name=d-${d.id},read-only=${o.ro}`,
    "-device",
    `virtio-blk-pci,id=disk-${d.id},drive=d-${d.id},bus=rp${d.slot}${d.serial ? `,serial=${v(d.serial)}` : ""}`,
  ];
}
