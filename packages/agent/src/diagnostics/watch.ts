import { boundedWatch, VmenvError } from "@vmenv/rpc";

/** A source of numbered changes that keeps its recent ones (for resume tokens). */
export interface ChangeSource<C extends { seq: number }> {
  subscribe(fn: (c: C) => void): () => void;
  /** Recent changes, oldest first. */
  history(): readonly C[];
  /** The latest change's seq. */
  seq(): number;
}

/** The ChangeSource of an emitter of numbered "change" events that keeps its recent ones (Operations, VmManager). */
export function changeSourceOf<C extends { seq: number }>(e: {
  on(event: "change", fn: (c: C) => void): unknown;
  off(event: "change", fn: (c: C) => void): unknown;
  readonly history: readonly C[];
  readonly seq: number;
}): ChangeSource<C> {
  return {
    subscribe: (fn) => {
      e.on("change", fn);
      return () => e.off("change", fn);
    },
    history: () => e.history,
    seq: () => e.seq,
  };
}

/** How many changes a watcher may fall behind before it is cut off. */
export const WATCH_QUEUE = 256;

/**
 * The Watch contract (design notes, "API conventions"), for any change source: without a resume token a
 * snapshot (`snapshot(seq)`), then every change after it; with one, the changes after it. A client that
 * falls `queueLimit` changes behind is cut off with RESOURCE_EXHAUSTED (WATCH_CLIENT_TOO_SLOW) instead of
 * the agent's memory growing; an unknown or expired token is OUT_OF_RANGE (RESUME_TOKEN_EXPIRED).
 * `toEvent` turns a change into what is sent (undefined: filtered out).
 */
export function watchChanges<C extends { seq: number }, E>(
  src: ChangeSource<C>,
  opts: {
    resumeToken: string;
    signal: AbortSignal;
    snapshot: (seq: number) => Iterable<E>;
    toEvent: (c: C) => E | undefined;
    queueLimit?: number;
  },
): AsyncGenerator<E> {
  return boundedWatch<C, E>({
    subscribe: (push) => src.subscribe(push),
    signal: opts.signal,
    queueLimit: opts.queueLimit ?? WATCH_QUEUE,
    start: () => {
      if (!opts.resumeToken) return { after: src.seq() };
      const from = Number(opts.resumeToken);
      const oldest = src.history()[0]?.seq ?? src.seq() + 1;
      if (
        !Number.isInteger(from) ||
        from < 0 ||
        from > src.seq() ||
        (from < oldest - 1 && from !== src.seq())
      ) {
        throw new VmenvError("out-of-range", "resume token is unknown or too old; watch again without one", {
          reason: "RESUME_TOKEN_EXPIRED",
        });
      }
      return { after: from, missed: src.history().filter((c) => c.seq > from) };
    },
    ...(opts.resumeToken ? {} : { head: opts.snapshot }),
    toEvent: opts.toEvent,
  });
}
