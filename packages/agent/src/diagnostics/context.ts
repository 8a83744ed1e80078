import { AsyncLocalStorage } from "node:async_hooks";

/** What every log line written on behalf of an operation carries. */
export interface OperationContext {
  /** `operations/{id}`. */
  operation: string;
  /** The resource the operation is on, e.g. `vms/web-1`. */
  target: string;
}

/** The context as stored: `active` turns false when the operation ends. */
interface StoredContext extends OperationContext {
  active: boolean;
}

/** The operation the current asynchronous work runs for (set by `Operations.start`). */
export const operationContext = new AsyncLocalStorage<StoredContext>();

/**
 * A pino `mixin`: log lines written while an operation runs carry its `operation` and `target`, so that
 * StreamLogs can filter on them (fields the line sets itself win).
 */
export function operationLogFields(): Partial<OperationContext> {
  const c = operationContext.getStore();
  // Work an operation set going may outlive it (a VMM's exit watcher, a console): once the operation has
  // ended, what that work logs is no longer on its behalf.
  return c?.active ? { operation: c.operation, target: c.target } : {};
}
