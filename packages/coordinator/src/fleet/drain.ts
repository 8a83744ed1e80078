/**
 * The "agent.drain" operation kind (DrainAgent): cordon the agent and mark it DRAINING, then move every
 * environment member placed on it away — one child "environment.migrate" per environment (only its
 * members on this agent, destinations by placement), at most `DRAIN_PARALLELISM` at a time — and end
 * with the agent empty and CORDONED. When members could not move the drain fails naming them; what
 * moved stays moved and the agent stays CORDONED. See docs/adr/0016-migration-and-drain.md.
 */
import { failedPrecondition, VmenvError } from "@vmenv/rpc/errors";
import { MIGRATE_KIND, type MigrateInput } from "../env/migrate.js";
import type { EnvRecord } from "../env/model.js";
import type { OperationKind, OpRecord, StepDef } from "../ops/types.js";
import { keys } from "../store/keys.js";
import type { JsonValue, Store } from "../store/store.js";

export const DRAIN_KIND = "agent.drain";
/** Environments migrated at the same time by one drain. */
export const DRAIN_PARALLELISM = 2;

export interface DrainInput {
  [k: string]: JsonValue | undefined;
  agent: string;
  reason: string;
  /** vmenv.agent.v1.MigrationSettings as protobuf JSON, or null. */
  settings: JsonValue;
  /** Give up (FAILED; what moved stays moved) after this long; 0: no limit. */
  timeoutMs: number;
}

export interface DrainDeps {
  store: Store;
  fleet: {
    setDraining(id: string, op: string | undefined, reason?: string): Promise<unknown>;
  };
  /** The operation engine: children are started with this drain as parent, and waited for. */
  engine: {
    start(
      kind: string,
      target: string,
      input: JsonValue,
      opts: { requestId?: string; parent?: string },
    ): Promise<OpRecord>;
    wait(id: string, timeoutMs: number, signal?: AbortSignal): Promise<OpRecord>;
  };
}

/** Members (as "env/member") placed on `agent`, per environment id. */
export async function membersOn(store: Store, agent: string): Promise<Map<string, string[]>> {
  const out = new Map<string, string[]>();
  for (const [, e] of await store.list<EnvRecord>(keys.envPrefix)) {
    const ids = e.members.filter((m) => m.agent === agent).map((m) => m.id);
    if (ids.length > 0) out.set(e.id, ids);
  }
  return out;
}

export function drainKind(deps: DrainDeps): OperationKind {
  return {
    kind: DRAIN_KIND,
    cancellable: true,
    afterCrash: "resume",
    plan(op) {
      const inp = op.input as DrainInput;
      const steps: StepDef[] = [
        {
          id: "cordon",
          description: `cordon agents/${inp.agent} and mark it DRAINING`,
          agent: `agents/${inp.agent}`,
          async run(ctx) {
            await deps.fleet.setDraining(inp.agent, ctx.op.id, inp.reason);
          },
        },
        {
          id: "migrate",
          description: `live-migrate every member on agents/${inp.agent} away (${DRAIN_PARALLELISM} environments at a time)`,
          async run(ctx) {
            const todo = [...(await membersOn(deps.store, inp.agent)).keys()];
            const known = (ctx.op.data.children ?? {}) as Record<string, string>;
            const deadline = inp.timeoutMs > 0 ? (ctx.op.startMs ?? Date.now()) + inp.timeoutMs : 0;
            // Children already started (before a restart) are waited for, not started again.
            const envs = [...new Set([...Object.keys(known), ...todo])].sort();
            let next = 0;
            let done = 0;
            const worker = async () => {
              while (next < envs.length) {
                const env = envs[next++] as string;
                let id = known[env];
                if (!id) {
                  const input: MigrateInput = {
                    env,
                    members: [],
                    agent: "",
                    from: inp.agent,
                    settings: inp.settings,
                  };
                  const child = await deps.engine.start(MIGRATE_KIND, `environments/${env}`, input, {
                    requestId: `${ctx.op.id}.drain.${env}`,
                    parent: ctx.op.id,
                  });
                  id = child.id;
                  known[env] = id;
                  await ctx.save({ children: { ...known } });
                }
                const left = deadline > 0 ? Math.max(0, deadline - Date.now()) : 24 * 3600_000;
                await deps.engine.wait(id, left, ctx.signal);
                done += 1;
                ctx.progress(
                  5 + (done / Math.max(1, envs.length)) * 90,
                  `moved ${done} of ${envs.length} environments`,
                );
              }
            };
            ctx.progress(5, `moving ${envs.length} environments off agents/${inp.agent}`);
            await Promise.all(Array.from({ length: Math.min(DRAIN_PARALLELISM, envs.length) }, worker));
          },
        },
        {
          id: "check",
          description: `check that nothing is left on agents/${inp.agent}`,
          async run() {
            const left = await membersOn(deps.store, inp.agent);
            // The drain is over either way: DRAINING → CORDONED before the final state is written.
            await deps.fleet.setDraining(inp.agent, undefined);
            if (left.size === 0) return;
            const names = [...left].flatMap(([env, ids]) => ids.map((m) => `${env}/${m}`));
            throw new VmenvError(
              "failed-precondition",
              `agents/${inp.agent} still has ${names.length} members that could not be moved: ${names.join(", ")} ` +
                "(see the drain's child operations for why); what moved stays moved",
              {
                reason: "DRAIN_INCOMPLETE",
                metadata: { agent: `agents/${inp.agent}`, members: names.join(",") },
              },
            );
          },
        },
      ];
      return steps;
    },
    // When the drain ends before its check (cancelled, failed), the DRAINING mark goes once the final
    // state is committed (the fleet writes in its own transaction).
    async result(op, tx) {
      tx.afterCommit(() => endDrain(deps, (op.input as DrainInput).agent));
      return undefined;
    },
    async onFailed(op, tx) {
      tx.afterCommit(() => endDrain(deps, (op.input as DrainInput).agent));
    },
  };
}

function endDrain(deps: DrainDeps, agent: string): void {
  deps.fleet.setDraining(agent, undefined).catch(() => undefined);
}

/** Refuses a drain of an agent that is DOWN (EvacuateAgent is for those). */
export function checkDrainable(view: { id: string; state: string }): void {
  if (view.state === "down")
    throw failedPrecondition(
      `agents/${view.id} is down; a down agent cannot be drained (use EvacuateAgent)`,
      "AGENT_DOWN",
      { agent: `agents/${view.id}` },
    );
}
