// The master's /distributed/ HTTP API as the panel uses it. The browser talks only to the master;
// api.fetchApi adds the right prefix on both the legacy and the current frontend.
import { api } from "../../scripts/api.js";

export class ApiError extends Error {
  constructor(message, { status = 0, errors = [] } = {}) {
    super(message);
    this.status = status;
    this.errors = errors; // one message per bad field, from a 400 answer
  }
}

async function call(method, path, body) {
  const options = { method, cache: "no-store" };
  if (body !== undefined) {
    options.headers = { "Content-Type": "application/json" };
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await api.fetchApi(path, options);
  } catch (err) {
    throw new ApiError(`cannot reach the master (${err.message})`);
  }
  let data = {};
  try {
    data = await response.json();
  } catch {
    // a proxy's or aiohttp's plain-text error page: the status line below says enough
  }
  if (!response.ok) {
    const message = data.error || `${method} ${path} answered ${response.status} ${response.statusText}`;
    throw new ApiError(message, { status: response.status, errors: data.errors || [] });
  }
  return data;
}

const worker = (id) => `/distributed/workers/${encodeURIComponent(id)}`;

export const master = {
  status: () => call("GET", "/distributed/status"),
  config: () => call("GET", "/distributed/config"),
  saveConfig: (config) => call("POST", "/distributed/config", config),
  clearVram: () => call("POST", "/distributed/clear_vram"),
  interrupt: () => call("POST", "/distributed/interrupt"),
  gpus: () => call("GET", "/distributed/gpus"),
  addWorker: (fields) => call("POST", "/distributed/workers", fields),
  editWorker: (id, fields) => call("PATCH", worker(id), fields),
  removeWorker: (id) => call("DELETE", worker(id)),
  startWorker: (id) => call("POST", `${worker(id)}/start`),
  stopWorker: (id) => call("POST", `${worker(id)}/stop`),
  workerLog: (id, lines = 200) => call("GET", `${worker(id)}/log?lines=${lines}`),
  secret: () => call("GET", "/distributed/secret"),

  // Settings without a route of their own: read the whole config, change it, save it back.
  async changeConfig(change) {
    const { config } = await call("GET", "/distributed/config");
    change(config);
    return call("POST", "/distributed/config", config);
  },
};
