import { createRegistry, toJson } from "@bufbuild/protobuf";
import {
  type Duration,
  durationFromMs,
  timestampDate,
  timestampFromDate,
  timestampFromMs,
} from "@bufbuild/protobuf/wkt";
import {
  DiagnosticsService,
  ErrorRecordSchema,
  LogEntrySchema,
  LogLevel,
  type Operation,
  OperationSchema,
  OperationState,
  type Statistics,
  StatisticsSchema,
  VmSchema,
  VmSnapshotSchema,
  VolumeSchema,
} from "@vmenv/api/agent/v1";
import { BadRequestSchema, ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import type { Command } from "commander";
import { bytes, keyValues, table } from "./output.js";

type Print = (json: unknown, text: () => string) => void;

/** What an operation's result or an error's details may hold, for JSON output. */
const registry = createRegistry(VmSchema, VmSnapshotSchema, VolumeSchema, ErrorInfoSchema, BadRequestSchema);
const stateName = (s: OperationState) => (OperationState[s] ?? "?").toLowerCase();
const seconds = (d: Duration | undefined) => (d ? Number(d.seconds) + d.nanos / 1e9 : 0);
const time = (t: Parameters<typeof timestampDate>[0] | undefined) =>
  t ? timestampDate(t).toISOString() : "-";

/** "operations/x" or "x" → "operations/x". */
export const opName = (id: string) => (id.startsWith("operations/") ? id : `operations/${id}`);

/** "10m", "2h", "30s" ago, or an ISO time → milliseconds since the epoch. */
export function parseSince(s: string, now = Date.now()): number {
  const rel = /^(\d+)(s|m|h|d)$/.exec(s.trim());
  if (rel?.[1] && rel[2]) return now - Number(rel[1]) * { s: 1e3, m: 6e4, h: 36e5, d: 864e5 }[rel[2] as "s"];
  const t = Date.parse(s);
  if (Number.isNaN(t)) throw new Error(`"${s}" is not a time (e.g. 10m, 2h, 2026-01-31T12:00:00Z)`);
  return t;
}

export function parseLevel(s: string): LogLevel {
  const l = { debug: LogLevel.DEBUG, info: LogLevel.INFO, warn: LogLevel.WARN, error: LogLevel.ERROR }[
    s.toLowerCase()
  ];
  if (l === undefined) throw new Error(`--level must be debug, info, warn or error, got "${s}"`);
  return l;
}

function parseState(s: string): OperationState {
  const v = OperationState[s.toUpperCase() as keyof typeof OperationState];
  if (typeof v !== "number" || v === OperationState.UNSPECIFIED)
    throw new Error(`--state must be pending, running, succeeded, failed or cancelled, got "${s}"`);
  return v;
}

function opsTable(ops: Operation[]): string {
  return table(
    ["ID", "KIND", "TARGET", "STATE", "PROGRESS", "STARTED", "ERROR"],
    ops.map((o) => [
      o.id,
      o.kind,
      o.target,
      stateName(o.state),
      `${o.progress?.percent ?? 0}% ${o.progress?.stage ?? ""}`.trim(),
      time(o.startTime ?? o.createTime),
      o.error?.message ?? "",
    ]),
  );
}

function opDetail(o: Operation): string {
  const rows: [string, string][] = [
    ["Name", o.name],
    ["Kind", o.kind],
    ["Target", o.target],
    ["State", stateName(o.state)],
    ["Progress", `${o.progress?.percent ?? 0}% ${o.progress?.stage ?? ""}`],
    ["May cancel", o.mayCancel ? "yes" : "no"],
    ["Created", time(o.createTime)],
    ["Ended", time(o.endTime)],
  ];
  if (o.error) rows.push(["Error", `${o.error.message} (code ${o.error.code})`]);
  if (o.result) rows.push(["Result", o.result.typeUrl.replace(/^.*\//, "")]);
  return keyValues(rows);
}

/** Statistics as a table per VM, with the host first. */
export function statsText(s: Statistics): string {
  const h = s.host;
  const cpu = h?.cpu;
  const busy = seconds(cpu?.user) + seconds(cpu?.system);
  const lines = [
    `host: load ${h?.loadAverage1m.toFixed(2)} ${h?.loadAverage5m.toFixed(2)} ${h?.loadAverage15m.toFixed(2)}, ` +
      `memory ${bytes(h?.memory?.availableBytes ?? 0n)} available of ${bytes(h?.memory?.totalBytes ?? 0n)}, ` +
      `CPU busy ${busy.toFixed(0)} s / idle ${seconds(cpu?.idle).toFixed(0)} s, ${h?.runningVms ?? 0} running VMs`,
  ];
  if (s.vms.length === 0) return lines.join("\n");
  lines.push(
    "",
    table(
      ["VM", "CPU", "VCPUS", "MEMORY", "RSS", "DISK R/W", "NET RX/TX"],
      s.vms.map((v) => [
        v.vm.replace(/^vms\//, ""),
        `${seconds(v.cpuTime).toFixed(2)} s`,
        v.vcpus.map((c) => `${seconds(c.cpuTime).toFixed(2)}`).join(" "),
        bytes(v.memoryBytes),
        bytes(v.memoryRssBytes),
        v.disks.length
          ? `${bytes(v.disks.reduce((a, d) => a + d.readBytes, 0n))} / ${bytes(v.disks.reduce((a, d) => a + d.writeBytes, 0n))}`
          : "-",
        v.nics.length
          ? `${bytes(v.nics.reduce((a, n) => a + n.rxBytes, 0n))} / ${bytes(v.nics.reduce((a, n) => a + n.txBytes, 0n))}`
          : "-",
      ]),
    ),
  );
  return lines.join("\n");
}

/** `vmenv ops …`, `vmenv stats`, `vmenv errors`, `vmenv logs`. */
export function diagCommands(program: Command, cfg: () => ClientConfig, print: Print): void {
  const client = () => createDaemonClient(DiagnosticsService, cfg());
  const opJson = (o: Operation) => toJson(OperationSchema, o, { registry });

  const ops = program.command("ops").description("the agent's operations: in progress and recent");
  ops
    .command("list")
    .description("operations, newest first")
    .option("--state <state...>", "only in these states (pending, running, succeeded, failed, cancelled)")
    .option("--kind <kind>", 'only of this kind, e.g. "vm.create"')
    .option("--target <name>", 'only on this resource, e.g. "vms/web-1"')
    .option("--limit <n>", "at most this many", "100")
    .action(async (o) => {
      const r = await client().listOperations({
        states: ((o.state as string[] | undefined) ?? []).map(parseState),
        kind: (o.kind as string | undefined) ?? "",
        target: (o.target as string | undefined) ?? "",
        pageSize: Number(o.limit),
      });
      print(r.operations.map(opJson), () => opsTable(r.operations));
    });
  ops
    .command("get <id>")
    .description("one operation")
    .action(async (id: string) => {
      const op = await client().getOperation({ name: opName(id) });
      print(opJson(op), () => opDetail(op));
    });
  ops
    .command("wait <id>")
    .description("wait until the operation is done (or --timeout passes), then print it")
    .option("--timeout <s>", "longest to wait, in seconds", "600")
    .action(async (id: string, o) => {
      const end = Date.now() + Number(o.timeout) * 1000;
      let op = await client().getOperation({ name: opName(id) });
      while (
        (op.state === OperationState.RUNNING || op.state === OperationState.PENDING) &&
        Date.now() < end
      ) {
        const ms = Math.min(60_000, end - Date.now());
        op = await client().waitOperation(
          { name: op.name, timeout: durationFromMs(ms) },
          { timeoutMs: ms + 10_000 },
        );
      }
      print(opJson(op), () => opDetail(op));
      if (op.state !== OperationState.SUCCEEDED) process.exitCode = 1;
    });
  ops
    .command("cancel <id>")
    .description("ask a running operation to stop and roll back")
    .action(async (id: string) => {
      const op = await client().cancelOperation({ name: opName(id) });
      print(opJson(op), () => `${op.name}: cancel requested (${stateName(op.state)})`);
    });
  ops
    .command("watch")
    .description("stream operations: those running now, then every change")
    .option("--kind <kind>", "only of this kind")
    .option("--target <name>", "only on this resource")
    .action(async (o) => {
      for await (const ev of client().watchOperations(
        { kind: (o.kind as string | undefined) ?? "", target: (o.target as string | undefined) ?? "" },
        { timeoutMs: 0 },
      )) {
        const op = ev.operation;
        print({ type: ev.type, operation: op ? opJson(op) : undefined, resumeToken: ev.resumeToken }, () =>
          `${(["", "initial", "synced", "created", "updated", "deleted"][ev.type] ?? "").padEnd(8)} ${
            op
              ? `${op.id} ${op.kind} ${op.target} ${stateName(op.state)} ${op.progress?.percent ?? 0}%${op.error ? ` ${op.error.message}` : ""}`
              : ""
          }`.trimEnd(),
        );
      }
    });

  program
    .command("stats [vms...]")
    .description("host and VM statistics (CPU, memory, disks, NICs); -w to keep sampling")
    .option("-w, --watch", "a sample every --interval")
    .option("--interval <s>", "seconds between samples (with --watch)", "5")
    .action(async (vms: string[], o) => {
      const names = vms.map((v) => (v.startsWith("vms/") ? v : `vms/${v}`));
      if (!o.watch) {
        const s = await client().getStatistics({ vms: names });
        print(toJson(StatisticsSchema, s), () => statsText(s));
        return;
      }
      for await (const s of client().watchStatistics(
        { vms: names, interval: durationFromMs(Number(o.interval) * 1000) },
        { timeoutMs: 0 },
      )) {
        print(toJson(StatisticsSchema, s), () => `${time(s.sampleTime)}\n${statsText(s)}\n`);
      }
    });

  program
    .command("errors")
    .description("errors the agent recorded (failed operations, VM crashes), newest first")
    .option("--target <name>", 'only about this resource, e.g. "vms/web-1"')
    .option("--reason <reason...>", 'only of these types, e.g. "VOLUME_IN_USE"')
    .option("--operation <id>", "only of this operation")
    .option("--since <time>", "only since then (10m, 2h, or an ISO time)")
    .option("--limit <n>", "at most this many", "100")
    .action(async (o) => {
      const r = await client().listErrors({
        target: (o.target as string | undefined) ?? "",
        reasons: (o.reason as string[] | undefined) ?? [],
        operation: o.operation ? opName(o.operation as string) : "",
        ...(o.since ? { startTime: timestampFromMs(parseSince(o.since as string)) } : {}),
        pageSize: Number(o.limit),
      });
      print(
        r.errors.map((e) => toJson(ErrorRecordSchema, e, { registry })),
        () =>
          table(
            ["TIME", "REASON", "TARGET", "OPERATION", "MESSAGE"],
            r.errors.map((e) => [
              time(e.time),
              e.reason,
              `${e.target}${e.element ? ` (${e.element})` : ""}`,
              e.operation.replace(/^operations\//, "") || "-",
              e.message,
            ]),
          ),
      );
    });

  program
    .command("logs")
    .description("the agent's log; -f to follow it")
    .option("-f, --follow", "keep printing entries as they are logged")
    .option("--level <level>", "least severe level: debug, info, warn, error", "info")
    .option("--operation <id>", "only entries of this operation")
    .option("--target <name>", 'only entries about this resource, e.g. "vms/web-1"')
    .option("--since <time>", "entries since then (10m, 2h, or an ISO time)")
    .option("-n, --lines <n>", "this many earlier entries (default 100 without --since)")
    .action(async (o) => {
      for await (const e of client().streamLogs(
        {
          minLevel: parseLevel(o.level as string),
          operation: o.operation ? opName(o.operation as string) : "",
          target: (o.target as string | undefined) ?? "",
          ...(o.since ? { since: timestampFromDate(new Date(parseSince(o.since as string))) } : {}),
          lastEntries: o.lines ? Number(o.lines) : 0,
          follow: Boolean(o.follow),
        },
        { timeoutMs: 0 },
      )) {
        print(toJson(LogEntrySchema, e), () => {
          const attrs = Object.entries(e.attributes)
            .map(([k, v]) => `${k}=${v}`)
            .join(" ");
          const lvl = (LogLevel[e.level] ?? "").toLowerCase().padEnd(5);
          return `${time(e.time)} ${lvl} ${e.component.padEnd(10)} ${e.message}${e.target ? ` [${e.target}]` : ""}${attrs ? ` ${attrs}` : ""}`;
        });
      }
    });
}
