import { resolve } from "node:path";
import { createRegistry, toJson } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import {
  DiagnosticsService,
  type Operation,
  OperationSchema,
  OperationState,
  type Vm,
  VmRestartPolicy,
  VmSchema,
  VmService,
  VmSnapshotSchema,
  VmState,
} from "@vmenv/api/agent/v1";
import { BadRequestSchema, ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import type { Command } from "commander";
import { bytes, duration, keyValues, table } from "./output.js";

type Print = (json: unknown, text: () => string) => void;

const stateName = (s: VmState) => (VmState[s] ?? "?").toLowerCase();
const MIB = 1024n * 1024n;

/** Parses "512M", "2G", "1073741824" into bytes. */
export function parseSize(s: string): bigint {
  const m = /^(\d+)([KMGT]i?B?)?$/i.exec(s.trim());
  if (!m?.[1]) throw new Error(`"${s}" is not a size (e.g. 512M, 2G)`);
  const unit = (m[2] ?? "").toUpperCase()[0];
  const mult = { K: 1024n, M: MIB, G: 1024n * MIB, T: 1024n * 1024n * MIB }[unit ?? ""] ?? 1n;
  return BigInt(m[1]) * mult;
}

function vmTable(vms: Vm[]): string {
  const now = Date.now();
  return table(
    ["NAME", "STATE", "VCPUS", "MEMORY", "PID", "UP", "READY"],
    vms.map((v) => [
      v.name.replace(/^vms\//, ""),
      stateName(v.state),
      String(v.spec?.vcpus ?? ""),
      v.spec ? bytes(v.spec.memoryBytes) : "",
      v.pid ? String(v.pid) : "-",
      v.startTime && v.pid ? duration((now - timestampDate(v.startTime).getTime()) / 1000) : "-",
      v.guestReadyTime ? "yes" : "no",
    ]),
  );
}

function vmDetail(v: Vm): string {
  const boot = v.spec?.boot?.method;
  return keyValues([
    ["Name", v.name],
    ["State", `${stateName(v.state)}${v.stateMessage ? ` (${v.stateMessage})` : ""}`],
    ["vCPUs", `${v.spec?.vcpus} (max ${v.spec?.maxVcpus})`],
    ["Memory", v.spec ? `${bytes(v.spec.memoryBytes)} (max ${bytes(v.spec.maxMemoryBytes)})` : ""],
    ["Boot", boot?.case === "directKernel" ? `kernel ${boot.value.kernelPath}` : String(boot?.case ?? "-")],
    ["PID", v.pid ? String(v.pid) : "-"],
    ["Guest ready", v.guestReadyTime ? timestampDate(v.guestReadyTime).toISOString() : "no"],
    ["Restarts", `${v.restartCount} (policy ${(VmRestartPolicy[v.restartPolicy] ?? "").toLowerCase()})`],
    [
      "Labels",
      Object.entries(v.labels)
        .map(([k, x]) => `${k}=${x}`)
        .join(", ") || "-",
    ],
  ]);
}

/** Waits for an operation to end; throws its error as a one-line failure. */
async function finish(cfg: ClientConfig, op: Operation, wait: boolean): Promise<Operation> {
  if (!wait) return op;
  const diag = createDaemonClient(DiagnosticsService, cfg);
  let cur = op;
  while (cur.state === OperationState.RUNNING || cur.state === OperationState.PENDING) {
    cur = await diag.waitOperation({ name: op.name, timeout: durationFromMs(60_000) }, { timeoutMs: 70_000 });
  }
  if (cur.state !== OperationState.SUCCEEDED) {
    throw new Error(
      `${cur.kind} ${cur.target} ${OperationState[cur.state].toLowerCase()}: ${cur.error?.message ?? ""}`,
    );
  }
  return cur;
}

/** `vmenv vm …` */
export function vmCommands(program: Command, cfg: () => ClientConfig, print: Print): void {
  const vm = program.command("vm").description("virtual machines on the agent");
  const client = () => createDaemonClient(VmService, cfg());
  const name = (id: string) => (id.startsWith("vms/") ? id : `vms/${id}`);
  const registry = createRegistry(VmSchema, VmSnapshotSchema, ErrorInfoSchema, BadRequestSchema);
  const printOp = async (op: Operation, wait: boolean) => {
    const done = await finish(cfg(), op, wait);
    const vm = done.result ? anyUnpack(done.result, VmSchema) : undefined;
    const snap = done.result ? anyUnpack(done.result, VmSnapshotSchema) : undefined;
    const summary = `${done.kind} ${done.target}: ${OperationState[done.state].toLowerCase()} (${done.name})`;
    if (vm) print(toJson(VmSchema, vm), () => vmDetail(vm));
    else if (snap)
      print(
        toJson(VmSnapshotSchema, snap),
        () => `${summary}\nsnapshot ${snap.name}: ${bytes(snap.memoryStateBytes)} of memory state`,
      );
    else print(toJson(OperationSchema, done, { registry }), () => summary);
  };

  vm.command("create <id>")
    .description("create a VM from a kernel (and start it unless --no-start)")
    .requiredOption("--kernel <path>", "kernel to boot (direct kernel boot)")
    .option("--initrd <path>", "initial ramdisk")
    .option("--cmdline <text>", "kernel command line", "console=ttyS0")
    .option("--vcpus <n>", "vCPUs", "1")
    .option("--max-vcpus <n>", "vCPUs it may grow to (hotplug)")
    .option("--memory <size>", "memory, e.g. 256M, 2G", "256M")
    .option("--max-memory <size>", "memory it may grow to (hotplug)")
    .option("--label <k=v...>", "labels")
    .option("--restart <policy>", "never | on-crash | always", "never")
    .option("--no-start", "create it stopped")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      const policy = {
        never: VmRestartPolicy.NEVER,
        "on-crash": VmRestartPolicy.ON_CRASH,
        always: VmRestartPolicy.ALWAYS,
      }[o.restart as string];
      if (policy === undefined)
        throw new Error(`--restart must be never, on-crash or always, got "${o.restart}"`);
      const labels = Object.fromEntries(
        ((o.label as string[] | undefined) ?? []).map((l) => l.split("=", 2) as [string, string]),
      );
      const op = await client().createVm({
        vmId: id,
        start: o.start as boolean,
        vm: {
          labels,
          restartPolicy: policy,
          spec: {
            vcpus: Number(o.vcpus),
            maxVcpus: o.maxVcpus ? Number(o.maxVcpus) : 0,
            memoryBytes: parseSize(o.memory as string),
            maxMemoryBytes: o.maxMemory ? parseSize(o.maxMemory as string) : 0n,
            boot: {
              method: {
                case: "directKernel",
                // Paths are the agent's; a relative one is taken from where the CLI runs.
                value: {
                  kernelPath: resolve(o.kernel),
                  initrdPath: o.initrd ? resolve(o.initrd) : "",
                  cmdline: o.cmdline,
                },
              },
            },
          },
        },
      });
      await printOp(op, o.wait as boolean);
    });

  vm.command("get <id>")
    .description("one VM")
    .action(async (id: string) => {
      const v = await client().getVm({ name: name(id) });
      print(toJson(VmSchema, v), () => vmDetail(v));
    });

  vm.command("list")
    .description("the agent's VMs")
    .option("--state <state...>", "only VMs in these states (running, stopped, …)")
    .option("--label <k=v...>", "only VMs with these labels")
    .action(async (o) => {
      const states = ((o.state as string[] | undefined) ?? []).map((s) => {
        const v = VmState[s.toUpperCase() as keyof typeof VmState];
        if (v === undefined) throw new Error(`unknown state "${s}"`);
        return v as VmState;
      });
      const labels = Object.fromEntries(
        ((o.label as string[] | undefined) ?? []).map((l) => l.split("=", 2) as [string, string]),
      );
      const vms: Vm[] = [];
      let pageToken = "";
      do {
        const r = await client().listVms({ states, labels, pageToken, pageSize: 500 });
        vms.push(...r.vms);
        pageToken = r.nextPageToken;
      } while (pageToken);
      print({ vms: vms.map((v) => toJson(VmSchema, v)) }, () => vmTable(vms));
    });

  for (const [verb, desc] of [
    ["start", "boot a stopped VM"],
    ["stop", "shut a VM down (ACPI, then power off after --timeout)"],
    ["reboot", "reboot a VM (graceful: stop and start; --force: reset)"],
  ] as const) {
    vm.command(`${verb} <id>`)
      .description(desc)
      .option("--force", "no grace: power off / reset at once")
      .option("--timeout <seconds>", "how long the guest may take to power off", "60")
      .option("--no-wait", "return the operation at once")
      .action(async (id: string, o) => {
        const c = client();
        const gracefulTimeout = durationFromMs(Number(o.timeout) * 1000);
        const op =
          verb === "start"
            ? await c.startVm({ name: name(id) })
            : verb === "stop"
              ? await c.stopVm({ name: name(id), force: Boolean(o.force), gracefulTimeout })
              : await c.rebootVm({ name: name(id), force: Boolean(o.force), gracefulTimeout });
        await printOp(op, o.wait as boolean);
      });
  }

  for (const verb of ["pause", "resume"] as const) {
    vm.command(`${verb} <id>`)
      .description(verb === "pause" ? "stop a VM's vCPUs" : "let a paused VM run again")
      .action(async (id: string) => {
        const v =
          verb === "pause"
            ? await client().pauseVm({ name: name(id) })
            : await client().resumeVm({ name: name(id) });
        print(toJson(VmSchema, v), () => vmDetail(v));
      });
  }

  vm.command("delete <id>")
    .description("delete a VM and everything the agent keeps for it")
    .option("--force", "also when it runs (its VMM is killed)")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      await printOp(await client().deleteVm({ name: name(id), force: Boolean(o.force) }), o.wait as boolean);
    });

  vm.command("snapshot <id> <snapshot-id>")
    .description("save a running VM's memory and device state (the guest pauses meanwhile)")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, sid: string, o) => {
      await printOp(
        await client().snapshotVm({ name: name(id), snapshotId: sid, includeMemory: true }),
        o.wait as boolean,
      );
    });

  vm.command("snapshots <id>")
    .description("a VM's snapshots")
    .action(async (id: string) => {
      const r = await client().listVmSnapshots({ parent: name(id) });
      print({ vmSnapshots: r.vmSnapshots.map((x) => toJson(VmSnapshotSchema, x)) }, () =>
        table(
          ["SNAPSHOT", "STATE", "MEMORY STATE", "CREATED"],
          r.vmSnapshots.map((x) => [
            x.name.split("/").pop() ?? "",
            stateName(x.vmState),
            bytes(x.memoryStateBytes),
            x.createTime ? timestampDate(x.createTime).toISOString() : "",
          ]),
        ),
      );
    });

  vm.command("restore <id> <snapshot-id>")
    .description("put a stopped VM back where one of its snapshots was")
    .option("--force", "stop it first if it runs (without asking the guest)")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, sid: string, o) => {
      const op = await client().restoreVm({
        name: name(id),
        snapshot: `${name(id)}/snapshots/${sid}`,
        force: Boolean(o.force),
      });
      await printOp(op, o.wait as boolean);
    });

  vm.command("clone <id> <new-id>")
    .description("a new VM from one of a VM's snapshots (it goes on from there), or from a stopped VM")
    .option("--snapshot <snapshot-id>", "the snapshot to clone from")
    .option("--no-start", "leave the clone stopped (paused, for a snapshot clone)")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, newId: string, o) => {
      const op = await client().cloneVm({
        name: name(id),
        vmId: newId,
        start: o.start as boolean,
        snapshot: o.snapshot ? `${name(id)}/snapshots/${o.snapshot}` : "",
      });
      await printOp(op, o.wait as boolean);
    });

  vm.command("resize <id>")
    .description("change vCPUs and memory (hotplug when it runs, up to its maximum)")
    .option("--vcpus <n>", "vCPUs")
    .option("--memory <size>", "memory, e.g. 512M")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      const op = await client().resizeVm({
        name: name(id),
        ...(o.vcpus ? { vcpus: Number(o.vcpus) } : {}),
        ...(o.memory ? { memoryBytes: parseSize(o.memory as string) } : {}),
      });
      await printOp(op, o.wait as boolean);
    });

  vm.command("watch")
    .description("stream VM changes (a snapshot first)")
    .action(async () => {
      for await (const ev of client().watchVms({}, { timeoutMs: 0 })) {
        const line = ev.vm
          ? `${ev.vm.name} ${stateName(ev.vm.state)}${ev.vm.stateMessage ? ` (${ev.vm.stateMessage})` : ""}`
          : "";
        print(
          { type: ev.type, vm: ev.vm ? toJson(VmSchema, ev.vm) : undefined, resumeToken: ev.resumeToken },
          () =>
            `${(["", "initial", "synced", "created", "updated", "deleted"][ev.type] ?? "").padEnd(8)} ${line}`,
        );
      }
    });

  vm.command("console <id>")
    .description("print the VM's serial console; -f to follow it, typing goes to the guest")
    .option("-n, --lines <n>", "start this many lines before the end", "50")
    .option("-f, --follow", "keep printing what comes, and send stdin to the console")
    .action(async (id: string, o) => {
      const c = client();
      if (o.follow && process.stdin.isTTY !== undefined) {
        process.stdin.on("data", (d: Buffer) => {
          void c.sendConsoleInput({ name: name(id), data: d });
        });
      }
      for await (const chunk of c.streamConsole(
        { name: name(id), lastLines: Number(o.lines), follow: Boolean(o.follow) },
        { timeoutMs: 0 },
      )) {
        process.stdout.write(chunk.data);
      }
      process.stdin.pause();
    });
}
