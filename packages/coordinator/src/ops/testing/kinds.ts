import { Writable } from "node:stream";
import type { Logger } from "@vmenv/rpc";
import { VmenvError } from "@vmenv/rpc/errors";
import pino from "pino";
import type { JsonValue } from "../../store/store.js";
import type { OperationKind, StepContext } from "../types.js";

/**
 * Test-only operation kinds over a fake external system (a set of named resources with a log of every
 * create and delete), so tests can tell whether a step's effect was applied exactly once.
 */
export interface World {
  has(name: string): Promise<boolean>;
  create(name: string): Promise<void>;
  remove(name: string): Promise<void>;
}

/** A world in memory; `log` lists every effect in order ("+a", "-a"). */
export class MemoryWorld implements World {
  readonly items = new Set<string>();
  readonly log: string[] = [];
  async has(name: string) {
    return this.items.has(name);
  }
  async create(name: string) {
    this.items.add(name);
    this.log.push(`+${name}`);
  }
  async remove(name: string) {
    this.items.delete(name);
    this.log.push(`-${name}`);
  }
}

export interface BuildInput {
  /** Resources to create, one step each. */
  items: string[];
  /** Environment lock to take. */
  env?: string;
  /** Step that fails with FAILED_PRECONDITION (after acting) / whose onComplete throws. */
  failAt?: string;
  failOnCompleteAt?: string;
  /** Step that throws UNAVAILABLE this many times before it works. */
  flakyAt?: string;
  flaky?: number;
  /** Step that blocks until its signal aborts (for cancel and stop tests). */
  blockAt?: string;
  /** Step that starts a child "test.build" for these items (same env). */
  childAt?: string;
  childItems?: string[];
}

/** Hooks tests use to watch or steer a kind. */
export interface Hooks {
  onRun?(step: string, ctx: StepContext): void | Promise<void>;
}

const input = (op: { input: JsonValue }) => op.input as unknown as BuildInput;

/**
 * "test.build": one step per item, each "measure, then act" (create when missing); the step's completion
 * writes `rec/{item}` in the completion's transaction; undo removes the item; result = the items.
 * onFailed writes `failed/{op}`.
 */
export function buildKind(
  world: World,
  hooks: Hooks = {},
  extra: Partial<OperationKind> = {},
): OperationKind {
  const flakes = new Map<string, number>();
  return {
    kind: "test.build",
    lock: (op) => input(op).env,
    plan(op) {
      const inp = input(op);
      return inp.items.map((item) => ({
        id: `make:${item}`,
        description: `make ${item}`,
        async run(ctx: StepContext) {
          await hooks.onRun?.(ctx.step.id, ctx);
          if (inp.flakyAt === item) {
            const n = flakes.get(op.id) ?? 0;
            if (n < (inp.flaky ?? 0)) {
              flakes.set(op.id, n + 1);
              throw new VmenvError("unavailable", "agent unreachable", { reason: "AGENT_UNREACHABLE" });
            }
          }
          if (inp.childAt === item) {
            const child = await ctx.child("test.build", op.target, {
              items: inp.childItems ?? [],
              ...(inp.blockAt ? { blockAt: inp.blockAt } : {}),
              ...(inp.env ? { env: inp.env } : {}),
            });
            if (child.state !== "succeeded")
              throw new VmenvError("aborted", "child failed", { reason: "CHILD_FAILED" });
          }
          if (inp.blockAt === item) {
            await new Promise<void>((_, reject) => {
              if (ctx.signal.aborted) reject(ctx.signal.reason);
              ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason), { once: true });
            });
          }
          await ctx.save({ [`saw:${item}`]: true });
          ctx.progress(50, `making ${item}`);
          if (!(await world.has(item))) await world.create(item);
          if (inp.failAt === item)
            throw new VmenvError("failed-precondition", `cannot make ${item}`, {
              reason: "NO_ROOM",
              metadata: { item },
            });
          ctx.onComplete(async (tx) => {
            if (inp.failOnCompleteAt === item)
              throw new VmenvError("resource-exhausted", `quota exceeded by ${item}`, {
                reason: "QUOTA_EXCEEDED",
                metadata: { item },
              });
            tx.put(`rec/${item}`, { op: op.id });
          });
        },
        async undo() {
          if (await world.has(item)) await world.remove(item);
        },
      }));
    },
    async result(op) {
      return { items: input(op).items };
    },
    async onFailed(op, tx) {
      tx.put(`failed/${op.id}`, op.error?.reason ?? "");
    },
    ...extra,
  };
}

/** A pino logger at debug whose lines are kept (parsed) in `lines`. */
export function captureLogger(): { logger: Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split("\n"))
        if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return { logger: pino({ level: "debug" }, stream) as unknown as Logger, lines };
}
