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

// A browser on another machine than the master needs the master's secret for every call (see
// distributed_core/access.py). The panel asks the user once, keeps it in this origin's localStorage
// and sends it as X-Distributed-Secret; when the master refuses it, the panel asks again.
const SECRET_KEY = "comfyui-distributed.secret";
const SECRET_HEADER = "X-Distributed-Secret";
let asking = null; // one question at a time, shared by the calls that wait for it
let declined = false; // the user cancelled: polls stop asking until the API secret button is pressed

export function storedSecret() {
  try {
    return localStorage.getItem(SECRET_KEY) || "";
  } catch {
    return ""; // storage disabled: ask every time instead
  }
}

function storeSecret(value) {
  try {
    if (value) localStorage.setItem(SECRET_KEY, value);
    else localStorage.removeItem(SECRET_KEY);
  } catch {
    // storage disabled
  }
}

// Ask for the secret; resolves to it, or to "" when the user cancels.
export function askForSecret(reason) {
  declined = false;
  if (!asking) {
    asking = Promise.resolve().then(() => {
      const given = (window.prompt(
        `${reason}\n\nThis browser is not on the master's machine, so the Distributed panel needs the `
        + "master's secret. The panel on the master's machine shows it (API secret).", "") || "").trim();
      if (given) storeSecret(given);
      else declined = true;
      return given;
    }).finally(() => { asking = null; });
  }
  return asking;
}

async function send(method, path, body) {
  const options = { method, cache: "no-store", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const secret = storedSecret();
  if (secret) options.headers[SECRET_HEADER] = secret;
  try {
    const response = await api.fetchApi(path, options);
    return { response, secret, data: await readJson(response) };
  } catch (err) {
    throw new ApiError(`cannot reach the master (${err.message})`);
  }
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return {}; // a proxy's or aiohttp's plain-text error page: the status line says enough
  }
}

async function call(method, path, body) {
  let { response, secret, data } = await send(method, path, body);
  // refused for want of the secret: ask (once for all waiting calls), then try again with it
  while (response.status === 403 && data.need === "secret" && !declined) {
    if (storedSecret() === secret) { // not one that another call has just been given
      if (secret) storeSecret("");
      if (!(await askForSecret(secret ? "The master refused the stored secret." : data.error))) break;
    }
    ({ response, secret, data } = await send(method, path, body));
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
  // The config where the master gives it without asking for the secret (at page load), else null.
  async configIfAllowed() {
    const { response, data } = await send("GET", "/distributed/config");
    return response.ok ? data : null;
  },
  spread: () => call("GET", "/distributed/spread"),
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
  // The worker doctor: every instance checked at once, for this API-format prompt when given.
  check: (prompt) => call("POST", "/distributed/check", prompt ? { prompt } : {}),

  // Settings without a route of their own: read the whole config, change it, save it back.
  async changeConfig(change) {
    const { config } = await call("GET", "/distributed/config");
    change(config);
    return call("POST", "/distributed/config", config);
  },
};
