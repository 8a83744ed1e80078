/**
 * @vmenv/api: the generated code of vmenv's protobuf API. Import a package's messages and services from
 * its subpath (`@vmenv/api/agent/v1`, `@vmenv/api/coordinator/v1`, `@vmenv/api/google/rpc`, …); this
 * entry point exports the registry of every file descriptor, which server reflection serves.
 */
export { allFiles } from "./gen/registry.js";
