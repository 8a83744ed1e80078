import { MIB } from "../domain.js";
import type { LaunchRequest } from "../driver.js";

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
  if (spec.boot.kind === "kernel") {
    args.push("-kernel", spec.boot.kernelPath);
    if (spec.boot.initrdPath) args.push("-initrd", spec.boot.initrdPath);
    args.push("-append", spec.boot.cmdline);
  }
  if (req.paused || req.incoming) args.push("-S");
  if (req.incoming) args.push("-incoming", `unix:${req.incoming}`);
  return args;
}
