// The file piscina loads in each worker thread. It loads task.js with import(), never with require().
//
// piscina tries require() on its filename first. On Node 24, require() of an ES module ends by building a CommonJS
// facade for it, and a thread terminated at that moment (a client closed while its threads were still loading)
// fails an internal assertion that aborts the whole process instead of ending the thread. import() has no such
// step. piscina awaits whatever it finds under the export name ('default'): here, task.js's default export.
export = import('./task.js').then((task) => task.default);
