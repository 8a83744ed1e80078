import { randomUUID } from "node:crypto";
import { toJson } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import {
  type Agent,
  AgentSchema,
  AgentService,
  AgentState,
  OperationSchema,
  OperationState,
  type RebalanceFleetResponse,
  RebalanceFleetResponseSchema,
} from "@vmenv/api/coordinator/v1";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import type { Command } from "commander";
import { awaitOperation } from "./op.js";
import { bytes, duration, keyValues, table } from "./output.js";

type Print = (json: unknown, text: () => string) => void;

const stateName = (s: AgentState) => (AgentState[s] ?? "?").toLowerCase();

/** "k=v" arguments → labels (a value may contain "="). */
export function parseLabels(args: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const a of args) {
    const i = a.indexOf("=");
    if (i <= 0) throw new Error(`"${a}" is not a label (key=value)`);
    out[a.slice(0, i)] = a.slice(i + 1);
  }
  return out;
}

/** What an agent offers to VMs, as the coordinator counts it (HostInfo.capacity). */
function capacity(a: Agent): { vcpus: number; memory: bigint } {
  const c = a.host?.capacity;
  return { vcpus: c?.vcpusAllocatable ?? 0, memory: c?.memoryAllocatableBytes ?? 0n };
}

function ago(a: Agent, now: number): string {
  if (!a.lastHeartbeatTime) return "never";
  return `${duration(Math.max(0, (now - timestampDate(a.lastHeartbeatTime).getTime()) / 1000))} ago`;
}

function agentTable(agents: Agent[]): string {
  const now = Date.now();
  return table(
    ["ID", "ADDRESS", "STATE", "VCPUS", "MEMORY", "HEARTBEAT"],
    agents.map((a) => {
      const cap = capacity(a);
      return [
        a.name.replace(/^agents\//, ""),
        a.address,
        stateName(a.state),
        `${a.allocated?.vcpus ?? 0}/${cap.vcpus}`,
        `${bytes(a.allocated?.memoryBytes ?? 0n)}/${bytes(cap.memory)}`,
        ago(a, now),
      ];
    }),
  );
}

function agentDetail(a: Agent): string {
  const cap = capacity(a);
  const h = a.host;
  return keyValues([
    ["Name", a.name],
    ["Address", a.address],
    ["State", `${stateName(a.state)}${a.stateMessage ? ` (${a.stateMessage})` : ""}`],
    ...(a.operation ? ([["Operation", a.operation]] as [string, string][]) : []),
    ["Heartbeat", ago(a, Date.now())],
    ["Host", h ? `${h.hostname}, ${h.cpu?.threads ?? 0} threads, agent ${h.agentVersion}` : "-"],
    ["vCPUs", `${a.allocated?.vcpus ?? 0} allocated of ${cap.vcpus}`],
    ["Memory", `${bytes(a.allocated?.memoryBytes ?? 0n)} allocated of ${bytes(cap.memory)}`],
    ["GPUs", `${a.allocated?.gpus ?? 0} allocated of ${h?.capacity?.gpusTotal ?? 0}`],
    ["VMs placed", String(a.allocated?.vms ?? 0)],
    [
      "Labels",
      Object.entries(a.labels)
        .map(([k, v]) => `${k}=${v}`)
        .join(", ") || "-",
    ],
  ]);
}

/** "0.85" or "85%" → 0.85 (the server checks the range). */
export function parseFraction(raw: string): number {
  const pct = raw.trim().endsWith("%");
  const n = Number(pct ? raw.trim().slice(0, -1) : raw);
  if (raw.trim() === "" || !Number.isFinite(n))
    throw new Error(`"${raw}" is not a fraction (0.85) or a percentage (85%)`);
  return pct ? n / 100 : n;
}

const pct = (x: number) => `${Math.round(x * 1000) / 10}%`;

/** A rebalancer pass: the move it made (or would make), or why none. */
export function rebalanceText(r: RebalanceFleetResponse, dryRun: boolean): string {
  if (r.moves.length === 0) return `nothing to move (watermark ${pct(r.watermark)}): ${r.reason}`;
  const head = dryRun
    ? `would move (dry run, watermark ${pct(r.watermark)}):`
    : `moving (watermark ${pct(r.watermark)}):`;
  return `${head}\n${table(
    ["MEMBER", "VCPUS", "MEMORY", "FROM", "LOAD", "TO", "LOAD", "OPERATION"],
    r.moves.map((m) => [
      `${m.environment.replace(/^environments\//, "")}/${m.memberId}`,
      String(m.usage?.vcpus ?? 0),
      bytes(m.usage?.memoryBytes ?? 0n),
      m.sourceAgent.replace(/^agents\//, ""),
      `${pct(m.sourceLoadBefore)} → ${pct(m.sourceLoadAfter)}`,
      m.destinationAgent.replace(/^agents\//, ""),
      `${pct(m.destinationLoadBefore)} → ${pct(m.destinationLoadAfter)}`,
      m.operation || "-",
    ]),
  )}`;
}

/** `vmenv agent …`: the coordinator's fleet. */
export function agentCommands(program: Command, cfg: () => ClientConfig, print: Print): void {
  const agent = program.command("agent").description("the coordinator's fleet of agents");
  const client = () => createDaemonClient(AgentService, cfg());
  const name = (id: string) => (id.startsWith("agents/") ? id : `agents/${id}`);
  const show = (a: Agent) => print(toJson(AgentSchema, a), () => agentDetail(a));

  agent
    .command("register <id> <address>")
    .description("add the agent listening on <address> (host:port) to the fleet")
    .option("--label <k=v...>", "labels for placement")
    .action(async (id: string, address: string, o) => {
      const labels = parseLabels((o.label as string[] | undefined) ?? []);
      show(
        await client().registerAgent({ agentId: id, agent: { address, labels }, requestId: randomUUID() }),
      );
    });

  agent
    .command("list")
    .description("the agents of the fleet")
    .option("--state <state...>", "only agents in these states (ready, cordoned, draining, down)")
    .option("--label <k=v...>", "only agents with these labels")
    .action(async (o) => {
      const states = ((o.state as string[] | undefined) ?? []).map((s) => {
        const v = AgentState[s.toUpperCase() as keyof typeof AgentState];
        if (v === undefined || v === AgentState.UNSPECIFIED) throw new Error(`unknown state "${s}"`);
        return v;
      });
      const labels = parseLabels((o.label as string[] | undefined) ?? []);
      const agents: Agent[] = [];
      let pageToken = "";
      do {
        const r = await client().listAgents({ states, labels, pageToken, pageSize: 500 });
        agents.push(...r.agents);
        pageToken = r.nextPageToken;
      } while (pageToken);
      print({ agents: agents.map((a) => toJson(AgentSchema, a)) }, () => agentTable(agents));
    });

  agent
    .command("get <id>")
    .description("one agent, with its host and what is placed on it")
    .action(async (id: string) => show(await client().getAgent({ name: name(id) })));

  agent
    .command("cordon <id>")
    .description("stop placing new VMs on the agent (what runs there stays)")
    .option("--reason <text>", "why, shown in its state message", "")
    .action(async (id: string, o) =>
      show(
        await client().cordonAgent({ name: name(id), reason: o.reason as string, requestId: randomUUID() }),
      ),
    );

  agent
    .command("uncordon <id>")
    .description("let placement use a cordoned agent again")
    .action(async (id: string) =>
      show(await client().uncordonAgent({ name: name(id), requestId: randomUUID() })),
    );

  agent
    .command("label <id> <k=v...>")
    .description('set labels k=v (others stay); "k-" removes label k')
    .action(async (id: string, kv: string[]) => {
      const c = client();
      const cur = await c.getAgent({ name: name(id) });
      const labels = { ...cur.labels };
      for (const k of kv.filter((a) => a.endsWith("-") && !a.includes("="))) delete labels[k.slice(0, -1)];
      Object.assign(labels, parseLabels(kv.filter((a) => !(a.endsWith("-") && !a.includes("=")))));
      show(
        await c.updateAgent({
          agent: { name: name(id), labels, etag: cur.etag },
          updateMask: { paths: ["labels"] },
          requestId: randomUUID(),
        }),
      );
    });

  agent
    .command("drain <id>")
    .description("cordon the agent and live-migrate every member on it to other agents")
    .option("--reason <text>", "why, shown in its state message", "")
    .option("--timeout <seconds>", "give up after this long (what moved stays moved)")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      let op = await client().drainAgent({
        name: name(id),
        reason: o.reason as string,
        ...(o.timeout ? { timeout: durationFromMs(Number(o.timeout) * 1000) } : {}),
        requestId: randomUUID(),
      });
      if (o.wait) op = await awaitOperation(cfg(), op);
      print(
        toJson(OperationSchema, op, { alwaysEmitImplicit: false }),
        () => `${op.kind} ${op.target}: ${OperationState[op.state]?.toLowerCase()} (${op.name})`,
      );
    });

  agent
    .command("evacuate <id>")
    .description(
      "recreate the members of a DOWN agent on other agents now (reschedule policy RECREATE; NEVER members stay lost)",
    )
    .option(
      "--force",
      "the agent need not be DOWN: mark it DOWN first (you vouch that it is dead or will be fenced); when it answers again its replaced copies are destroyed before it is ready",
    )
    .option("--request-id <id>", "for retry-safe replay")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      let op = await client().evacuateAgent({
        name: name(id),
        force: !!o.force,
        requestId: (o.requestId as string) ?? randomUUID(),
      });
      if (o.wait) op = await awaitOperation(cfg(), op);
      print(
        toJson(OperationSchema, op, { alwaysEmitImplicit: false }),
        () => `${op.kind} ${op.target}: ${OperationState[op.state]?.toLowerCase()} (${op.name})`,
      );
    });

  agent
    .command("rebalance")
    .description(
      "move one running member off the most loaded agent above the watermark to the least loaded agent that fits it (when that helps), now",
    )
    .option("--dry-run", "show the move, start nothing")
    .option(
      "--watermark <fraction>",
      "load above which an agent is overloaded, e.g. 0.85 or 85% (default: the coordinator's)",
    )
    .action(async (o) => {
      const r = await client().rebalanceFleet({
        ...(o.watermark !== undefined ? { watermark: parseFraction(o.watermark as string) } : {}),
        dryRun: !!o.dryRun,
        requestId: randomUUID(),
      });
      print(toJson(RebalanceFleetResponseSchema, r), () => rebalanceText(r, !!o.dryRun));
    });

  agent
    .command("remove <id>")
    .description("take the agent out of the fleet")
    .option("--force", "even though VMs are placed on it (they become lost)")
    .action(async (id: string, o) => {
      await client().removeAgent({ name: name(id), force: !!o.force, requestId: randomUUID() });
      print({ removed: name(id) }, () => `removed ${name(id)}`);
    });
}
