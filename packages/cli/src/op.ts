import { createRegistry, toJson } from "@bufbuild/protobuf";
import { anyIs, anyUnpack, durationFromMs, type Timestamp, timestampDate } from "@bufbuild/protobuf/wkt";
import type { Code } from "@connectrpc/connect";
import { allFiles } from "@vmenv/api";
import {
  type Operation,
  OperationSchema,
  OperationService,
  OperationState,
  StepState,
  WatchEventType,
} from "@vmenv/api/coordinator/v1";
import { ErrorInfoSchema, type Status } from "@vmenv/api/google/rpc";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import type { Command } from "commander";
import { codeName } from "./errors.js";
import { keyValues, table } from "./output.js";

type Print = (json: unknown, text: () => string) => void;

/** Every API type, so that an operation's `result` (an Any) prints as JSON. */
const registry = createRegistry(...allFiles);

const lower = (s: string | undefined) => (s ?? "?").toLowerCase();
const opState = (s: OperationState) => lower(OperationState[s]);
const stepState = (s: StepState) => lower(StepState[s]);
const time = (t: Timestamp | undefined) => (t ? timestampDate(t).toISOString() : "-");
const bare = (name: string) => name.replace(/^operations\//, "");
const FINAL = new Set([OperationState.SUCCEEDED, OperationState.FAILED, OperationState.CANCELLED]);

/** `x` or `operations/x` → `operations/x`. */
export function opName(id: string): string {
  return id.startsWith("operations/") ? id : `operations/${id}`;
}

/** "running" → OperationState.RUNNING; an error naming the valid states otherwise. */
export function parseOpState(s: string): OperationState {
  const v = OperationState[s.toUpperCase().replace(/-/g, "_") as keyof typeof OperationState];
  if (v === undefined || v === OperationState.UNSPECIFIED)
    throw new Error(
      `unknown state "${s}"; one of pending, running, rolling_back, succeeded, failed, cancelled`,
    );
  return v;
}

/** One line per operation. */
export function opTable(ops: Operation[]): string {
  return table(
    ["ID", "KIND", "TARGET", "STATE", "PROGRESS", "CREATED"],
    ops.map((o) => [
      o.id,
      o.kind,
      o.target,
      opState(o.state),
      o.progress ? `${o.progress.percent}%${o.progress.stage ? ` ${o.progress.stage}` : ""}` : "-",
      time(o.createTime),
    ]),
  );
}

/** An operation in detail, with its steps as a table. */
export function opDetail(o: Operation): string {
  const rows: [string, string][] = [
    ["Name", o.name],
    ["Kind", o.kind],
    ["Target", o.target],
    ["State", `${opState(o.state)}${o.mayCancel ? " (may cancel)" : ""}`],
    ["Progress", `${o.progress?.percent ?? 0}%${o.progress?.stage ? ` ${o.progress.stage}` : ""}`],
    ["Created", time(o.createTime)],
    ["Started", time(o.startTime)],
    ["Ended", time(o.endTime)],
  ];
  if (o.environmentLock) rows.push(["Lock", o.environmentLock]);
  if (o.blockedBy) rows.push(["Blocked by", o.blockedBy]);
  if (o.parent) rows.push(["Parent", o.parent]);
  if (o.children.length > 0) rows.push(["Children", o.children.join(", ")]);
  if (o.requestId) rows.push(["Request id", o.requestId]);
  if (o.resumeCount > 0) rows.push(["Resumed", `${o.resumeCount} time(s) after a coordinator restart`]);
  if (o.error) rows.push(["Error", statusLine(o.error)]);
  const steps = table(
    ["STEP", "STATE", "ATTEMPTS", "AGENT", "DETAIL"],
    o.steps.map((s) => [
      s.id,
      stepState(s.state),
      String(s.attempts),
      s.agent ? s.agent.replace(/^agents\//, "") : "-",
      s.error?.message ?? (s.childOperation || s.agentOperation || s.description),
    ]),
  );
  return `${keyValues(rows)}\n\n${o.steps.length > 0 ? steps : "(no steps yet)"}`;
}

/** google.rpc.Status → "FAILED_PRECONDITION: message (reason X, k=v)". */
export function statusLine(st: Status): string {
  const info = st.details
    .filter((d) => anyIs(d, ErrorInfoSchema))
    .map((d) => anyUnpack(d, ErrorInfoSchema))[0];
  const extra = info
    ? ` (reason ${info.reason}${Object.entries(info.metadata)
        .map(([k, v]) => `, ${k}=${v}`)
        .join("")})`
    : "";
  return `${codeName(st.code as Code)}: ${st.message}${extra}`;
}

const json = (o: Operation) => toJson(OperationSchema, o, { registry });

/** `vmenv op …`: the coordinator's operations (`vmenv ops …` is the agent's). */
/**
 * Waits until a coordinator operation has finished and returns it; throws with its error unless it
 * succeeded. What `vmenv env …` and `vmenv agent drain/evacuate` do unless given --no-wait.
 */
export async function awaitOperation(cfg: ClientConfig, op: Operation): Promise<Operation> {
  const ops = createDaemonClient(OperationService, cfg);
  let cur = op;
  while (!FINAL.has(cur.state))
    cur = await ops.waitOperation({ name: op.name, timeout: durationFromMs(60_000) }, { timeoutMs: 70_000 });
  if (cur.state !== OperationState.SUCCEEDED)
    throw new Error(`${cur.kind} ${cur.target} ${opState(cur.state)}: ${cur.error?.message ?? ""}`);
  return cur;
}

export function opCommands(program: Command, cfg: () => ClientConfig, print: Print): void {
  const op = program
    .command("op")
    .description("the coordinator's operations (durable, step by step; `vmenv ops` is an agent's)");
  const client = () => createDaemonClient(OperationService, cfg());

  op.command("list")
    .description("operations, newest first")
    .option(
      "--state <state...>",
      "only these states (pending, running, rolling_back, succeeded, failed, cancelled)",
    )
    .option("--kind <kind>", 'only this kind, e.g. "environment.create"')
    .option("--target <name>", 'only on this resource, e.g. "environments/shop"')
    .option("--parent <id>", "only the children of this operation")
    .option("--limit <n>", "at most this many", "100")
    .action(async (o) => {
      const limit = Number(o.limit);
      if (!Number.isInteger(limit) || limit <= 0)
        throw new Error(`--limit must be a positive integer, got "${o.limit}"`);
      const states = ((o.state as string[] | undefined) ?? []).map(parseOpState);
      const ops: Operation[] = [];
      let pageToken = "";
      do {
        const r = await client().listOperations({
          states,
          kind: (o.kind as string | undefined) ?? "",
          target: (o.target as string | undefined) ?? "",
          parent: o.parent ? opName(o.parent as string) : "",
          pageSize: Math.min(limit - ops.length, 1000),
          pageToken,
        });
        ops.push(...r.operations);
        pageToken = r.nextPageToken;
      } while (pageToken && ops.length < limit);
      print({ operations: ops.map(json) }, () => opTable(ops));
    });

  op.command("get <id>")
    .description("one operation, with its steps")
    .action(async (id: string) => {
      const o = await client().getOperation({ name: opName(id) });
      print(json(o), () => opDetail(o));
    });

  op.command("wait <id>")
    .description("wait until an operation has finished (exit status 1 unless it succeeded)")
    .option("--timeout <seconds>", "give up after this long (the operation goes on)", "600")
    .action(async (id: string, o) => {
      const seconds = Number(o.timeout);
      if (!(seconds > 0))
        throw new Error(`--timeout must be a positive number of seconds, got "${o.timeout}"`);
      const end = Date.now() + seconds * 1000;
      let cur = await client().getOperation({ name: opName(id) });
      while (!FINAL.has(cur.state) && Date.now() < end) {
        const left = Math.min(end - Date.now(), 60_000);
        cur = await client().waitOperation(
          { name: cur.name, timeout: durationFromMs(left) },
          { timeoutMs: left + 10_000 },
        );
      }
      print(json(cur), () => opDetail(cur));
      if (!FINAL.has(cur.state)) throw new Error(`${cur.name} still ${opState(cur.state)} after ${seconds}s`);
      if (cur.state !== OperationState.SUCCEEDED) process.exitCode = 1;
    });

  op.command("cancel <id>")
    .description("stop an operation and roll back what it did (asynchronous: see `op wait`)")
    .action(async (id: string) => {
      const o = await client().cancelOperation({ name: opName(id) });
      print(json(o), () => `${o.name}: cancel requested (${opState(o.state)})`);
    });

  op.command("watch")
    .description("stream operations: the unfinished ones first, then every change")
    .option("--target <name>", "only on this resource")
    .option("--kind <kind>", "only this kind")
    .option("--root <id>", "only this operation and its descendants")
    .action(async (o) => {
      const stream = client().watchOperations(
        {
          target: (o.target as string | undefined) ?? "",
          kind: (o.kind as string | undefined) ?? "",
          root: o.root ? opName(o.root as string) : "",
        },
        { timeoutMs: 0 },
      );
      for await (const ev of stream) {
        const type = lower(WatchEventType[ev.type]);
        const x = ev.operation;
        print({ type, operation: x ? json(x) : undefined, resumeToken: ev.resumeToken }, () =>
          x
            ? `${type.padEnd(8)} ${bare(x.name)} ${x.kind} ${x.target} ${opState(x.state)}` +
              `${x.progress?.stage ? ` ${x.progress.percent}% ${x.progress.stage}` : ""}`
            : `${type}`,
        );
      }
    });
}
