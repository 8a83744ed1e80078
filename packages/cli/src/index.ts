export { codeName, describeError } from "./errors.js";
export { hostInfoTable } from "./host.js";
export { bytes, cpuList, duration, keyValues, table } from "./output.js";
