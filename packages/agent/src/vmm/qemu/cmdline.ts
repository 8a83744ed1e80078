import { MIB } from "../domain.js";
import { type AttachedDisk, HOTPLUG_SLOTS, type LaunchRequest } from "../driver.js";

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
  const args = [
    "-name",
    `guest=${req.id},process=vmenv-${req.id},debug-threads=on`,
    "-machine",
    `q35,accel=${accelerator}`,
    "-cpu",
    accelerator === "kvm" ? "host" : "max",
    "-smp",
    `${spec.vcpus},maxcpus=${spec.maxVcpus}`,
    "-m",
    maxMib > memMib ? `${memMib}M,slots=8,maxmem=${maxMib}M` : `${memMib}M`,
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
  if (spec.boot.kind === "kernel") {
    args.push("-kernel", spec.boot.kernelPath);
    if (spec.boot.initrdPath) args.push("-initrd", spec.boot.initrdPath);
    args.push("-append", spec.boot.cmdline);
  }
  if (req.paused || req.incoming) args.push("-S");
  if (req.incoming) args.push("-incoming", `unix:${req.incoming}`);
  return args;
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
