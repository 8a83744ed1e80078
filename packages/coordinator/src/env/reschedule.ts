/**
 * Rescheduling members of a DOWN agent (docs/adr/0017-failure-detection-and-fencing.md).
 *
 * - `reschedulePolicy(m)`: a member's ReschedulePolicy (NEVER unless set; delay 5 min; 3 attempts).
 * - The operation kind `environment.reschedule` (env lock): places the LOST members of one DOWN agent
 *   elsewhere, recreates their volumes (from their image: local data is lost) and VMs there, switches
 *   the members over in one transaction (which moves their agent allocation from the dead agent to the
 *   new one; tree usage is unchanged; the kinds' `isUp` hooks run so a balancer lists them again), and
 *   starts those that ran. The switch commits only while the old agent is DOWN and not being fenced
 *   (`fleet.replaceable`): an agent that comes back first keeps its members, and the copies made for
 *   them are undone. Failed attempts count; past `max_attempts` the member is FAILED.
 * - `Rescheduler`: a timer that starts such an operation for every environment with RECREATE members
 *   LOST on an agent DOWN for at least their policy's delay.
 */
import { failedPrecondition, VmenvError } from "@vmenv/rpc/errors";
import { type Usage, usageFromStore, usageToStore } from "../domain/usage.js";
import type { AgentView } from "../fleet/fleet.js";
import type { OperationKind, OpRecord, StepContext, StepDef } from "../ops/types.js";
import type { AgentClients } from "../ports.js";
import { keys } from "../store/keys.js";
import type { JsonValue as StoreJson, Txn } from "../store/store.js";
import { deleteVm, deleteVolume, ensureVm, ensureVolume, startVm, stopVm, syncOutputs } from "./agent.js";
import { envResult } from "./convert.js";
import { builtinKinds, planEvent } from "./kinds.js";
import { type EnvRecord, type MemberRecord, memberUsage, vmId } from "./model.js";
import { type EnvDeps, mutateEnv, placeMembers, readEnv, rid, target } from "./ops.js";

export const RESCHEDULE_KIND = "environment.reschedule";
export const DEFAULT_RESCHEDULE_DELAY_MS = 5 * 60_000;
export const DEFAULT_RESCHEDULE_ATTEMPTS = 3;

/** What rescheduling needs from the fleet beyond EnvDeps. */
export interface RescheduleFleet {
  /** Whether members may be moved off agent `id` now (DOWN, not being fenced), in `tx`. */
  replaceable(tx: Txn, id: string): Promise<boolean>;
  /** When agent `id` was marked DOWN, or undefined while it is not DOWN. */
  downSinceMs(id: string): number | undefined;
  /** The agent's clients even while it is DOWN (Fleet.clientsEvenIfDown), to stop a live old copy. */
  clientsEvenIfDown(id: string): AgentClients;
}

/** How long a start waits for a live `from` agent to stop the member's old copy (`stopOld`). */
const STOP_OLD_TIMEOUT_MS = 5000;

export type RescheduleDeps = EnvDeps & { fleet: EnvDeps["fleet"] & RescheduleFleet };

export interface ReschedulePolicyValue {
  mode: "NEVER" | "RECREATE";
  delayMs: number;
  maxAttempts: number;
}

/** protobuf JSON of a Duration ("300s", "1.500s") → ms; undefined when absent or malformed. */
export function durationJsonMs(v: unknown): number | undefined {
  if (typeof v !== "string") return undefined;
  const m = /^(\d+)(?:\.(\d{1,9}))?s$/.exec(v);
  if (!m) return undefined;
  return Number(m[1]) * 1000 + Math.floor(Number(`0.${m[2] ?? "0"}`) * 1000);
}

/** The member's reschedule policy with its defaults applied. */
export function reschedulePolicy(m: Pick<MemberRecord, "reschedulePolicy">): ReschedulePolicyValue {
  const p = (m.reschedulePolicy ?? {}) as { mode?: string; delay?: string; maxAttempts?: number };
  return {
    mode: p.mode === "RESCHEDULE_MODE_RECREATE" ? "RECREATE" : "NEVER",
    delayMs: durationJsonMs(p.delay) ?? DEFAULT_RESCHEDULE_DELAY_MS,
    maxAttempts: p.maxAttempts && p.maxAttempts > 0 ? p.maxAttempts : DEFAULT_RESCHEDULE_ATTEMPTS,
  };
}

/** Reschedule bookkeeping kept on the member record (extra JSON fields). */
interface MemberExtra {
  /** The state the member had when its agent went down (events.ts). */
  lostState?: string;
  rescheduleAttempts?: number;
  lastRescheduleMs?: number;
}
const extra = (m: MemberRecord) => m as MemberRecord & MemberExtra;

export interface RescheduleInput {
  [k: string]: StoreJson | undefined;
  env: string;
  /** The DOWN agent the members leave. */
  from: string;
  /** Member ids; empty: every eligible member on `from`. */
  members: string[];
  /** Started by EvacuateAgent: the attempts limit does not apply. */
  evacuate: boolean;
  /**
   * `from` may still be alive (EvacuateAgent with force): stop each member's old copy there, if it
   * answers, before starting the new one, so that the two never run together.
   */
  stopOld?: boolean;
}

interface Move {
  [k: string]: StoreJson | undefined;
  id: string;
  to: string;
  start: boolean;
}

/** Members of `e` that a reschedule off `from` would move. */
export function eligible(e: EnvRecord, inp: Pick<RescheduleInput, "from" | "members" | "evacuate">) {
  return e.members.filter((m) => {
    if (m.agent !== inp.from || m.state !== "LOST") return false;
    if (inp.members.length > 0 && !inp.members.includes(m.id)) return false;
    const p = reschedulePolicy(m);
    if (p.mode !== "RECREATE") return false;
    return inp.evacuate || (extra(m).rescheduleAttempts ?? 0) < p.maxAttempts;
  });
}

const moveKey = (op: string, member: string) => keys.move(`${op}.${member}`);
interface MoveCharge {
  [k: string]: StoreJson | undefined;
  agent: string;
  usage: ReturnType<typeof usageToStore>;
}

/** The operation kind `environment.reschedule`. */
export function rescheduleKind(deps: RescheduleDeps): OperationKind {
  const kinds = deps.kinds ?? builtinKinds;
  return {
    kind: RESCHEDULE_KIND,
    lock: (op) => (op.input as RescheduleInput).env,
    cancellable: false,
    plan(op) {
      const inp = op.input as RescheduleInput;
      const steps: StepDef[] = [
        {
          id: "place",
          description: `place the members lost on agents/${inp.from} on other agents and reserve their room`,
          async run(ctx) {
            const e = await readEnv(deps.store, inp.env);
            const ms = e ? eligible(e, inp) : [];
            const ok = await deps.store.transact((tx) => deps.fleet.replaceable(tx, inp.from));
            if (!e || ms.length === 0 || !ok) {
              await ctx.save({ moves: [], members: [] });
              return;
            }
            await ctx.save({ members: ms.map((m) => m.id) });
            const ids = new Set(ms.map((m) => m.id));
            const peers = e.members.filter((m) => !ids.has(m.id) && m.agent && m.agent !== inp.from);
            const placed = await placeMembers(
              deps,
              e.node,
              ms.map((m) => ({ ...m, agent: "" })),
              peers,
            );
            const moves: Move[] = placed.map((p) => {
              const was = extra(ms.find((m) => m.id === p.id) as MemberRecord).lostState;
              return {
                id: p.id,
                to: p.agent,
                start: was === undefined || was === "RUNNING" || was === "STARTING",
              };
            });
            await ctx.save({ moves });
            ctx.onComplete(async (tx) => {
              for (const mv of moves) {
                const m = ms.find((x) => x.id === mv.id) as MemberRecord;
                const u = memberUsage(m);
                await deps.fleet.charge(tx, mv.to, u);
                const c: MoveCharge = { agent: mv.to, usage: usageToStore(u) };
                tx.put(moveKey(op.id, mv.id), c);
              }
              await mutateEnv(deps, tx, inp.env, (x) => {
                for (const mv of moves) {
                  const m = x.members.find((y) => y.id === mv.id);
                  if (m)
                    m.stateMessage = `agents/${inp.from} is down; being recreated on agents/${mv.to} (data on its local volumes is lost)`;
                }
              });
            });
          },
          async undo(ctx) {
            await deps.store.transact(async (tx) => {
              for (const id of (ctx.op.data.members ?? []) as string[]) {
                const c = await tx.get<MoveCharge>(moveKey(ctx.op.id, id));
                if (!c) continue;
                await deps.fleet.release(tx, c.agent, usageFromStore(c.usage));
                tx.del(moveKey(ctx.op.id, id));
              }
            });
          },
        },
      ];
      const moves = (op.data.moves ?? []) as Move[];
      const e0 = () => readEnv(deps.store, inp.env);
      /**
       * Stops (force) member `id`'s old copy on `from` when that agent answers within a few seconds.
       * One that does not is taken for dead, as the operator said; it is fenced when it answers.
       */
      const stopOldCopy = async (ctx: StepContext, id: string) => {
        const old = { id: inp.from, clients: deps.fleet.clientsEvenIfDown(inp.from) };
        let timer: NodeJS.Timeout | undefined;
        let outcome = "stopped";
        try {
          await Promise.race([
            stopVm(old, inp.env, id, rid(ctx, "stop-old"), { force: true }),
            new Promise((_, reject) => {
              timer = setTimeout(
                () => reject(new Error(`no answer in ${STOP_OLD_TIMEOUT_MS} ms`)),
                STOP_OLD_TIMEOUT_MS,
              );
            }),
          ]);
        } catch (err) {
          outcome = `not stopped: ${err instanceof Error ? err.message : String(err)}`;
          deps.logger.warn(
            { op: `operations/${ctx.op.id}`, agent: `agents/${inp.from}`, member: id, err },
            "could not stop the old copy on the evacuated agent; it is fenced when it answers",
          );
        } finally {
          clearTimeout(timer);
        }
        await ctx.save({ [`old.${id}`]: outcome });
      };
      for (const mv of moves) {
        steps.push({
          id: `volumes.${mv.id}`,
          description: `recreate the volumes of ${mv.id} on agents/${mv.to}`,
          agent: `agents/${mv.to}`,
          async run(ctx) {
            const m = (await e0())?.members.find((x) => x.id === mv.id);
            if (!m) return;
            const a = target(deps, ctx, mv.to);
            for (const v of m.volumes) await ensureVolume(a, inp.env, m.id, v, rid(ctx, `vol-${v.id}`));
          },
          async undo(ctx) {
            const m = (await e0())?.members.find((x) => x.id === mv.id);
            if (!m || m.agent === mv.to) return;
            const a = target(deps, ctx, mv.to);
            for (const v of m.volumes)
              await deleteVolume(a, inp.env, m.id, v.id, rid(ctx, `undo-vol-${v.id}`));
          },
        });
        steps.push({
          id: `vm.${mv.id}`,
          description: `recreate the VM of ${mv.id} on agents/${mv.to}`,
          agent: `agents/${mv.to}`,
          async run(ctx) {
            const m = (await e0())?.members.find((x) => x.id === mv.id);
            if (!m) return;
            await ensureVm(target(deps, ctx, mv.to), inp.env, m, rid(ctx, "vm"));
          },
          async undo(ctx) {
            const m = (await e0())?.members.find((x) => x.id === mv.id);
            if (m?.agent === mv.to) return;
            await deleteVm(target(deps, ctx, mv.to), inp.env, mv.id, rid(ctx, "undo-vm"));
          },
        });
      }
      if (moves.length > 0) {
        steps.push({
          id: "switch",
          description: `move the members from agents/${inp.from} to their new agents`,
          async run(ctx) {
            ctx.onComplete(async (tx) => {
              if (!(await deps.fleet.replaceable(tx, inp.from)))
                throw failedPrecondition(
                  `agents/${inp.from} answers again (it is being fenced or is up): its members stay there`,
                  "AGENT_RETURNED",
                  { agent: `agents/${inp.from}`, environment: `environments/${inp.env}` },
                );
              const e = await readEnv(tx, inp.env);
              if (!e) throw failedPrecondition(`environments/${inp.env} is gone`, "ENVIRONMENT_GONE", {});
              const since = deps.fleet.downSinceMs(inp.from);
              const sinceText = since ? ` at ${new Date(since).toISOString()}` : "";
              for (const mv of moves) {
                const m = e.members.find((x) => x.id === mv.id);
                if (!m || m.agent !== inp.from || m.state !== "LOST") continue;
                const u: Usage = memberUsage(m);
                await deps.fleet.release(tx, inp.from, u);
                tx.del(moveKey(ctx.op.id, mv.id));
                m.agent = mv.to;
                m.vm = vmId(inp.env, m.id);
                m.state = "STOPPED";
                m.stateMessage = `recreated on agents/${mv.to} after agents/${inp.from} went down${sinceText}; data on its local volumes was lost`;
                delete extra(m).lostState;
                extra(m).rescheduleAttempts = 0;
              }
              for (const mv of moves) {
                const plan = planEvent(
                  { id: e.id, node: e.node, labels: e.labels, members: e.members },
                  "isUp",
                  mv.id,
                  kinds,
                );
                for (const id of plan.changed) {
                  const m = e.members.find((x) => x.id === id);
                  const p = plan.members.find((x) => x.id === id);
                  if (m && p) m.outputs = p.outputs;
                }
              }
              e.updateMs = deps.clock.now();
              tx.put(keys.env(e.id), e);
            });
          },
        });
        for (const mv of moves.filter((x) => x.start))
          steps.push({
            id: `start.${mv.id}`,
            description: `start ${mv.id} on agents/${mv.to}`,
            agent: `agents/${mv.to}`,
            async run(ctx) {
              let message = "";
              if (inp.stopOld) await stopOldCopy(ctx, mv.id);
              try {
                await startVm(target(deps, ctx, mv.to), inp.env, mv.id, rid(ctx, "start"));
              } catch (err) {
                // The member lives on its new agent now: a failed boot is its state, not a rollback.
                message = `recreated on agents/${mv.to} but could not start: ${err instanceof Error ? err.message : String(err)}`;
              }
              ctx.onComplete(async (tx) => {
                await mutateEnv(deps, tx, inp.env, (x) => {
                  const m = x.members.find((y) => y.id === mv.id);
                  if (!m || m.agent !== mv.to) return;
                  if (message) m.stateMessage = message;
                  else m.state = "RUNNING";
                });
              });
            },
          });
        steps.push({
          id: "outputs",
          description: "set the members' outputs on their VMs' labels",
          async run(ctx) {
            const e = await readEnv(deps.store, inp.env);
            for (const m of e?.members ?? []) {
              if (!m.agent || m.state === "LOST" || Object.keys(m.outputs).length === 0) continue;
              try {
                await syncOutputs(target(deps, ctx, m.agent), inp.env, m, rid(ctx, `labels-${m.id}`));
              } catch (err) {
                deps.logger.warn(
                  { err, environment: `environments/${inp.env}`, member: m.id },
                  "could not set outputs on the VM",
                );
              }
            }
          },
        });
      }
      return steps;
    },
    async onFailed(op, tx) {
      const inp = op.input as RescheduleInput;
      const ids = new Set((op.data.members ?? inp.members) as string[]);
      const why = op.error?.message ?? "unknown error";
      await mutateEnv(deps, tx, inp.env, (e) => {
        for (const m of e.members) {
          if (!ids.has(m.id) || m.agent !== inp.from || m.state !== "LOST") continue;
          const x = extra(m);
          const n = (x.rescheduleAttempts ?? 0) + 1;
          const max = reschedulePolicy(m).maxAttempts;
          x.rescheduleAttempts = n;
          x.lastRescheduleMs = deps.clock.now();
          if (n >= max && !inp.evacuate) {
            m.state = "FAILED";
            m.stateMessage = `agents/${inp.from} is down and recreating the member elsewhere failed ${n} times (max_attempts ${max}); last: ${why}`;
          } else
            m.stateMessage = `agents/${inp.from} is down; recreating it elsewhere failed (attempt ${n} of ${max}): ${why}`;
        }
      });
      // Room reserved by `place` whose undo could not run is given back here.
      for (const id of ids) {
        const c = await tx.get<MoveCharge>(moveKey(op.id, id));
        if (!c) continue;
        await deps.fleet.release(tx, c.agent, usageFromStore(c.usage));
        tx.del(moveKey(op.id, id));
      }
    },
    async result(op, tx) {
      const e = await readEnv(tx, (op.input as RescheduleInput).env);
      return e ? envResult(e) : undefined;
    },
  };
}

/** Pause between failed attempts of one member. */
export const RETRY_BACKOFF_MS = 2_000;

/**
 * Starts reschedule operations when they are due: for each environment no operation holds, the
 * RECREATE members LOST on a DOWN agent (not being fenced) whose delay has passed since the agent went
 * down, with attempts left. Runs every `intervalMs`; state lives in the store, so a restarted
 * coordinator carries on.
 */
export class Rescheduler {
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  #stopped = false;
  constructor(
    private readonly deps: RescheduleDeps & {
      engine: {
        start(kind: string, target: string, input: StoreJson, o: { wait?: boolean }): Promise<OpRecord>;
      };
    },
  ) {}

  start(intervalMs: number): void {
    const tick = () => {
      if (this.#stopped || this.#running !== undefined) return;
      this.#running = this.runOnce()
        .then(() => undefined)
        .catch((err: unknown) => this.deps.logger.warn({ err }, "reschedule pass failed"))
        .finally(() => {
          this.#running = undefined;
        });
    };
    this.#timer = setInterval(tick, intervalMs);
    this.#timer.unref();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
    await this.#running;
  }

  /** One pass; returns the operations it started. */
  async runOnce(): Promise<OpRecord[]> {
    const { store, clock, fleet } = this.deps;
    const now = clock.now();
    const down = new Map<string, AgentView>();
    for (const v of fleet.views())
      if (v.state === "down" && !v.stateMessage.startsWith("fencing:")) down.set(v.id, v);
    if (down.size === 0) return [];
    const started: OpRecord[] = [];
    for (const [, e] of await store.list<EnvRecord>(keys.envPrefix)) {
      const byAgent = new Map<string, string[]>();
      for (const m of e.members) {
        if (m.state !== "LOST" || !down.has(m.agent)) continue;
        const p = reschedulePolicy(m);
        if (p.mode !== "RECREATE" || (extra(m).rescheduleAttempts ?? 0) >= p.maxAttempts) continue;
        const since = fleet.downSinceMs(m.agent) ?? now;
        if (now < since + p.delayMs || now < (extra(m).lastRescheduleMs ?? 0) + RETRY_BACKOFF_MS) continue;
        byAgent.set(m.agent, [...(byAgent.get(m.agent) ?? []), m.id]);
      }
      if (byAgent.size === 0 || (await store.get(keys.lock(e.id)))) continue;
      for (const [from, members] of byAgent) {
        const input: RescheduleInput = { env: e.id, from, members, evacuate: false };
        try {
          const op = await this.deps.engine.start(RESCHEDULE_KIND, `environments/${e.id}`, input, {
            wait: false,
          });
          started.push(op);
          this.deps.logger.info(
            {
              environment: `environments/${e.id}`,
              agent: `agents/${from}`,
              members,
              op: `operations/${op.id}`,
            },
            "rescheduling members of a down agent",
          );
        } catch (err) {
          if (err instanceof VmenvError && err.code === "aborted") break;
          throw err;
        }
      }
    }
    return started;
  }
}
