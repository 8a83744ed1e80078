/** The List helpers moved to @vmenv/rpc, shared with the coordinator. */
export { noFilter, page } from "@vmenv/rpc";
