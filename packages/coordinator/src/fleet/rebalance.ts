/**
 * The rebalancer (seed 001: "balances load … at runtime by migrating a VM from one host to another";
 * docs/adr/0018-rebalancer.md). A pass:
 *
 * 1. **Load** of an agent: the largest fraction allocated/allocatable of its vCPUs and memory
 *    (`Agent.allocated`, claims included, over `capacityFromHost`, through placement's `fullness`).
 *    A READY agent whose load is above the watermark is overloaded.
 * 2. For the most loaded overloaded agent (then the next, when nothing on it can move), the members that
 *    may move: RUNNING (live migration only), not pinned to the agent (`placement.agent`), no GPU
 *    passed through (the agent refuses to migrate those), in an environment that no operation holds,
 *    that is not FAILED and that the rebalancer did not move within its cooldown.
 * 3. Destinations for each: the agents placement says fit it (READY, labels, networks, room, affinity;
 *    never the source), least loaded first, kept only when the move helps: the destination's load after
 *    the move is at or below the watermark **and** below the source's load after it (no ping-pong).
 * 4. The member: among those that bring the source to or under the watermark, the one that moves the
 *    least memory; otherwise the one that moves the most.
 * 5. The move: an ordinary `environment.migrate` operation of that one member to that agent, its reason
 *    "rebalance: …". One rebalance migration runs at a time. The environment is not moved again by the
 *    rebalancer until `cooldownMs` after that migration ended: `rebalance/{env}` records the move
 *    (written before the operation starts, with its request id), so a restart keeps the cooldown.
 *
 * `planRebalance` is the pure part (steps 1–4); `Rebalancer` reads the store, starts the operation,
 * keeps the cooldown records and runs a pass every `--rebalance-interval-ms`.
 */
import type { Logger } from "@vmenv/rpc";
import { invalidArgument, VmenvError } from "@vmenv/rpc/errors";
import { addUsage, subUsage, type Usage, usageFromStore, usageToStore } from "../domain/usage.js";
import { MIGRATE_KIND, type MigrateInput } from "../env/migrate.js";
import { type EnvRecord, memberUsage } from "../env/model.js";
import { placementRequest } from "../env/ops.js";
import { isFinal } from "../ops/engine.js";
import type { OpRecord } from "../ops/types.js";
import { fullness, type PlacementCandidate, place } from "../placement/place.js";
import type { Clock } from "../ports.js";
import { keys } from "../store/keys.js";
import type { JsonValue, Store, StoreReader } from "../store/store.js";
import type { EffectivePolicy } from "../tree/domain.js";
import { requestReused } from "./fleet.js";
import type { AgentCapacity } from "./types.js";

export const DEFAULT_REBALANCE_WATERMARK = 0.85;
export const DEFAULT_REBALANCE_COOLDOWN_MS = 5 * 60_000;
/** Reasons of members that cannot move, listed per agent before "and N more". */
const LISTED = 6;

/** An agent's load: the larger of its allocated/allocatable vCPUs and memory (0 when it offers none). */
export function agentLoad(allocated: Usage, capacity: AgentCapacity): number {
  const f = fullness(allocated, capacity);
  return Math.max(f.vcpus ?? 0, f.memory ?? 0);
}

/** INVALID_ARGUMENT naming `field` unless 0 < watermark ≤ 1. */
export function checkWatermark(watermark: number, field = "watermark"): void {
  if (!(watermark > 0 && watermark <= 1))
    throw invalidArgument(
      field,
      `${watermark} is not a load fraction: it must be greater than 0 and at most 1 (0.85 is 85%)`,
      "INVALID_WATERMARK",
    );
}

/** 0.853 → "85.3%". */
export const percent = (x: number) => `${Math.round(x * 1000) / 10}%`;

/** One member the rebalancer moves, with the loads it expects. */
export interface RebalanceMove {
  env: string;
  member: string;
  usage: Usage;
  from: string;
  to: string;
  sourceLoadBefore: number;
  sourceLoadAfter: number;
  destinationLoadBefore: number;
  destinationLoadAfter: number;
  /** Id of the migration started (absent for a dry run). */
  operation?: string;
}

/** What a pass did, or would do. */
export interface RebalanceResult {
  watermark: number;
  dryRun: boolean;
  /** At most one. */
  moves: RebalanceMove[];
  /** Why nothing moves, in words; "" when something does. */
  reason: string;
}

/** An environment as the planner sees it. */
export interface PlanEnv {
  env: EnvRecord;
  /** Its tree node's effective policy (placement's labels and networks). */
  policy: EffectivePolicy;
  /** Why none of its members may move now (held by an operation, cooling down …); "" if they may. */
  blocked: string;
}

/** The pure part of a pass: which member goes where, or why none. */
export function planRebalance(
  agents: PlacementCandidate[],
  envs: PlanEnv[],
  watermark: number,
): { move?: RebalanceMove; reason: string } {
  const loads = new Map(agents.map((a) => [a.id, agentLoad(a.allocated, a.capacity)]));
  const loadOf = (id: string) => loads.get(id) ?? 0;
  const ready = agents
    .filter((a) => a.state === "ready")
    .sort((a, b) => loadOf(b.id) - loadOf(a.id) || cmp(a.id, b.id));
  const over = ready.filter((a) => loadOf(a.id) > watermark);
  if (over.length === 0) {
    const top = ready[0];
    return {
      reason: top
        ? `no READY agent is above the watermark (${percent(watermark)}); the most loaded is agents/${top.id} at ${percent(loadOf(top.id))}`
        : "no READY agents",
    };
  }
  const notes: string[] = [];
  for (const src of over) {
    const before = loadOf(src.id);
    const others = agents.filter((a) => a.id !== src.id);
    const why: string[] = [];
    const moves: RebalanceMove[] = [];
    for (const { env: e, policy, blocked } of envs) {
      const here = e.members.filter((m) => m.agent === src.id);
      if (here.length === 0) continue;
      if (blocked) {
        why.push(`environments/${e.id}: ${blocked}`);
        continue;
      }
      for (const m of here) {
        const name = `${e.id}/${m.id}`;
        const need = memberUsage(m);
        const pin = (m.placement as { agent?: string } | null)?.agent;
        if (m.state !== "RUNNING") {
          why.push(`${name}: ${m.state.toLowerCase()} (only running members move live)`);
          continue;
        }
        if (pin) {
          why.push(`${name}: pinned to ${pin}`);
          continue;
        }
        if (need.gpus > 0) {
          why.push(`${name}: passes a GPU through (cannot live-migrate)`);
          continue;
        }
        let fits: string[];
        try {
          const req = placementRequest(
            { ...m, agent: "" },
            policy,
            e.members.filter((x) => x.id !== m.id),
          );
          delete req.agent;
          fits = place(req, others).ranked.map((r) => r.agent);
        } catch (err) {
          why.push(`${name}: ${err instanceof Error ? err.message : String(err)}`);
          continue;
        }
        const after = agentLoad(subUsage(src.allocated, need), src.capacity);
        const dests = fits
          .map((id) => others.find((a) => a.id === id) as PlacementCandidate)
          .map((d) => ({ d, after: agentLoad(addUsage(d.allocated, need), d.capacity) }))
          .sort((a, b) => loadOf(a.d.id) - loadOf(b.d.id) || cmp(a.d.id, b.d.id));
        const best = dests.find((x) => x.after <= watermark && x.after < after);
        if (!best) {
          const least = dests[0];
          why.push(
            `${name}: no agent that fits it would stay at or below ${percent(watermark)} and below agents/${src.id}'s ${percent(after)} after the move` +
              (least ? ` (the least loaded, agents/${least.d.id}, would be at ${percent(least.after)})` : ""),
          );
          continue;
        }
        moves.push({
          env: e.id,
          member: m.id,
          usage: need,
          from: src.id,
          to: best.d.id,
          sourceLoadBefore: before,
          sourceLoadAfter: after,
          destinationLoadBefore: loadOf(best.d.id),
          destinationLoadAfter: best.after,
        });
      }
    }
    const move = choose(moves, watermark);
    if (move) return { move, reason: "" };
    const listed = why.slice(0, LISTED).join("; ");
    const more = why.length > LISTED ? `; and ${why.length - LISTED} more` : "";
    notes.push(
      `agents/${src.id} is at ${percent(before)} (above ${percent(watermark)}) but nothing on it can move: ${listed || "none of its load belongs to an environment member"}${more}`,
    );
  }
  return { reason: notes.join(". ") };
}

/**
 * Among moves that bring their source to or under the watermark, the one that moves the least memory;
 * otherwise the one that moves the most (then fewer/more vCPUs, then by name, so the same input always
 * gives the same answer).
 */
function choose(moves: RebalanceMove[], watermark: number): RebalanceMove | undefined {
  const name = (m: RebalanceMove) => `${m.env}/${m.member}`;
  const size = (a: RebalanceMove, b: RebalanceMove) =>
    a.usage.memoryBytes < b.usage.memoryBytes
      ? -1
      : a.usage.memoryBytes > b.usage.memoryBytes
        ? 1
        : a.usage.vcpus - b.usage.vcpus;
  const enough = moves.filter((m) => m.sourceLoadAfter <= watermark);
  if (enough.length > 0) return enough.sort((a, b) => size(a, b) || cmp(name(a), name(b)))[0];
  return moves.sort((a, b) => size(b, a) || cmp(name(a), name(b)))[0];
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

// ---- the rebalancer: store, operations, cooldown, loop ------------------------------------------------

/** `rebalance/{env}`: the rebalancer's last move of an environment. */
interface CooldownRecord {
  [k: string]: JsonValue | undefined;
  env: string;
  member: string;
  from: string;
  to: string;
  /** The migration's request id (written first: the operation is found by it after a crash). */
  requestId: string;
  /** The migration's id, once started. */
  op: string;
  startMs: number;
}

/** What the migration's input keeps of the plan, for a replayed request. */
interface StoredMove {
  [k: string]: JsonValue | undefined;
  usage: ReturnType<typeof usageToStore>;
  watermark: number;
  sourceLoadBefore: number;
  sourceLoadAfter: number;
  destinationLoadBefore: number;
  destinationLoadAfter: number;
}

type RebalanceInput = MigrateInput & { rebalance: StoredMove };

export interface RebalanceDeps {
  store: Store;
  clock: Clock;
  logger: Logger;
  fleet: { views(): PlacementCandidate[] };
  tree: { effectivePolicy(reader: StoreReader, path: string): Promise<EffectivePolicy> };
  engine: {
    start(
      kind: string,
      target: string,
      input: JsonValue,
      opts: { requestId?: string; wait?: boolean },
    ): Promise<OpRecord>;
    get(id: string): Promise<OpRecord>;
  };
  /** Default watermark of a pass (0 < w ≤ 1). */
  watermark: number;
  /** How long after a rebalance migration ended its environment is not moved again. */
  cooldownMs: number;
}

export class Rebalancer {
  #timer: NodeJS.Timeout | undefined;
  #loop: Promise<unknown> | undefined;
  #stopped = false;
  /** Passes run one after the other (the loop's and RebalanceFleet's). */
  #queue: Promise<unknown> = Promise.resolve();

  constructor(private readonly deps: RebalanceDeps) {
    checkWatermark(deps.watermark, "--rebalance-watermark");
  }

  /** Runs a pass every `intervalMs` (the first one an interval after the start); 0: never. */
  start(intervalMs: number): void {
    if (intervalMs <= 0) return;
    this.#timer = setInterval(() => {
      if (this.#stopped || this.#loop !== undefined) return;
      this.#loop = this.runOnce()
        .catch((err: unknown) => this.deps.logger.warn({ err }, "rebalance pass failed"))
        .finally(() => {
          this.#loop = undefined;
        });
    }, intervalMs);
    this.#timer.unref();
  }

  /** Stops the timer and waits for the passes under way (the loop's and RebalanceFleet's). */
  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
    await this.#loop;
    await this.#queue;
  }

  /**
   * One pass (see the module comment): starts at most one migration and says what it did or why it
   * did nothing. `dryRun` starts nothing; a `requestId` already used returns the move it started.
   * INVALID_ARGUMENT (INVALID_WATERMARK) unless 0 < watermark ≤ 1.
   */
  async runOnce(
    opts: { watermark?: number; dryRun?: boolean; requestId?: string } = {},
  ): Promise<RebalanceResult> {
    const watermark = opts.watermark ?? this.deps.watermark;
    checkWatermark(watermark);
    const pass = this.#queue.then(() => this.#pass(watermark, !!opts.dryRun, opts.requestId ?? ""));
    this.#queue = pass.catch(() => undefined);
    return pass;
  }

  async #pass(watermark: number, dryRun: boolean, requestId: string): Promise<RebalanceResult> {
    const { store, clock } = this.deps;
    const result = (moves: RebalanceMove[], reason: string): RebalanceResult => ({
      watermark,
      dryRun,
      moves,
      reason,
    });
    if (requestId && !dryRun) {
      const replay = await this.#replay(requestId);
      if (replay) return replay;
    }
    const now = clock.now();
    // The cooldown records: a migration still running stops the pass; the others cool their environment.
    const cooling = new Map<string, string>();
    for (const [key, rec] of await store.list<CooldownRecord>(keys.rebalancePrefix)) {
      const op = await this.#opOf(rec);
      const moving = `${rec.env}/${rec.member} from agents/${rec.from} to agents/${rec.to}`;
      if (op && !isFinal(op.state))
        return result(
          [],
          `a rebalance migration is still running (operations/${op.id} moves ${moving}); one runs at a time`,
        );
      const until = (op?.endMs ?? rec.startMs) + this.deps.cooldownMs;
      if (until > now)
        cooling.set(
          rec.env,
          `moved by the rebalancer (${op ? `operations/${op.id}` : moving}); not again before ${new Date(until).toISOString()}`,
        );
      else if (!dryRun) await store.transact(async (tx) => void tx.del(key));
    }
    const agents = this.deps.fleet.views();
    const over = new Set(
      agents
        .filter((a) => a.state === "ready" && agentLoad(a.allocated, a.capacity) > watermark)
        .map((a) => a.id),
    );
    const envs: PlanEnv[] = [];
    if (over.size > 0) {
      const locks = new Map(
        (await store.list<string>(keys.lockPrefix)).map(([k, op]) => [k.slice(keys.lockPrefix.length), op]),
      );
      for (const [, env] of await store.list<EnvRecord>(keys.envPrefix)) {
        if (!env.members.some((m) => over.has(m.agent))) continue;
        const lock = locks.get(env.id);
        const blocked = env.failed
          ? "the environment is FAILED"
          : lock
            ? `operations/${lock} holds the environment`
            : (cooling.get(env.id) ?? "");
        const policy = await this.deps.tree.effectivePolicy(store, env.node);
        envs.push({ env, policy, blocked });
      }
    }
    const plan = planRebalance(agents, envs, watermark);
    if (!plan.move) {
      this.deps.logger.debug({ watermark, reason: plan.reason }, "rebalance: nothing to move");
      return result([], plan.reason);
    }
    if (dryRun) return result([plan.move], "");
    return this.#start(plan.move, watermark, requestId || `rebalance.${plan.move.env}.${now.toString(36)}`);
  }

  /** Records the move, then starts its migration. */
  async #start(move: RebalanceMove, watermark: number, requestId: string): Promise<RebalanceResult> {
    const { store, engine, clock, logger } = this.deps;
    const rec: CooldownRecord = {
      env: move.env,
      member: move.member,
      from: move.from,
      to: move.to,
      requestId,
      op: "",
      startMs: clock.now(),
    };
    await store.transact(async (tx) => void tx.put(keys.rebalance(move.env), rec));
    const input: RebalanceInput = {
      env: move.env,
      members: [move.member],
      agent: move.to,
      from: move.from,
      settings: null,
      reason: `rebalance: agents/${move.from} at ${percent(move.sourceLoadBefore)} > ${percent(watermark)}`,
      rebalance: {
        usage: usageToStore(move.usage),
        watermark,
        sourceLoadBefore: move.sourceLoadBefore,
        sourceLoadAfter: move.sourceLoadAfter,
        destinationLoadBefore: move.destinationLoadBefore,
        destinationLoadAfter: move.destinationLoadAfter,
      },
    };
    let op: OpRecord;
    try {
      op = await engine.start(MIGRATE_KIND, `environments/${move.env}`, input, { requestId, wait: false });
    } catch (err) {
      await store.transact(async (tx) => void tx.del(keys.rebalance(move.env)));
      // An operation took the environment since the plan was made: nothing moves this time.
      if (err instanceof VmenvError && err.reason === "ENVIRONMENT_LOCKED")
        return { watermark, dryRun: false, moves: [], reason: err.message };
      throw err;
    }
    await store.transact(async (tx) => void tx.put(keys.rebalance(move.env), { ...rec, op: op.id }));
    logger.info(
      {
        environment: `environments/${move.env}`,
        member: move.member,
        from: `agents/${move.from}`,
        to: `agents/${move.to}`,
        load: [
          move.sourceLoadBefore,
          move.sourceLoadAfter,
          move.destinationLoadBefore,
          move.destinationLoadAfter,
        ],
        op: `operations/${op.id}`,
      },
      "rebalance: moving a member off an overloaded agent",
    );
    return { watermark, dryRun: false, moves: [{ ...move, operation: op.id }], reason: "" };
  }

  /** The migration of a cooldown record (by id, or by its request id after a crash), if it exists. */
  async #opOf(rec: CooldownRecord): Promise<OpRecord | undefined> {
    const id = rec.op || (await this.deps.store.get<string>(keys.opRequest(rec.requestId)));
    return id ? this.deps.engine.get(id).catch(() => undefined) : undefined;
  }

  /** The result of the pass that used `requestId`, when one started a migration with it. */
  async #replay(requestId: string): Promise<RebalanceResult | undefined> {
    const id = await this.deps.store.get<string>(keys.opRequest(requestId));
    const op = id ? await this.deps.engine.get(id).catch(() => undefined) : undefined;
    if (!op) return undefined;
    const inp = op.input as Partial<RebalanceInput>;
    if (op.kind !== MIGRATE_KIND || !inp.rebalance || !inp.env || !inp.members?.[0])
      throw requestReused(requestId);
    const s = inp.rebalance;
    return {
      watermark: s.watermark,
      dryRun: false,
      reason: "",
      moves: [
        {
          env: inp.env,
          member: inp.members[0],
          usage: usageFromStore(s.usage),
          from: inp.from ?? "",
          to: inp.agent ?? "",
          sourceLoadBefore: s.sourceLoadBefore,
          sourceLoadAfter: s.sourceLoadAfter,
          destinationLoadBefore: s.destinationLoadBefore,
          destinationLoadAfter: s.destinationLoadAfter,
          operation: op.id,
        },
      ],
    };
  }
}
