{
  'targets': [
    {
      'target_name': 'sockpool_native',
      'sources': ['sockpool_native.cc'],
      # node-addon-api with C++ exceptions: the settings of its `node_addon_api_except` target (except.gypi
      # defines NAPI_CPP_EXCEPTIONS and drops -fno-exceptions), included directly rather than as a gyp
      # dependency, which would make gyp write that target's makefiles to native/node_modules/. Paths are
      # relative: node-addon-api is a direct dependency of the root package, and resolving it by path avoids
      # running whichever `node` is first on PATH (the machine's Node 20).
      'includes': ['../node_modules/node-addon-api/except.gypi'],
      'include_dirs': ['../node_modules/node-addon-api'],
      # NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS: a worker thread that is being terminated cannot take a JS
      # exception; without it node-addon-api rethrows as a C++ exception that nothing catches, and the whole
      # process aborts (seen when a client closed while its threads were still loading this addon).
      'defines': ['NAPI_VERSION=9', 'NODE_ADDON_API_DISABLE_DEPRECATED', 'NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS'],
      'cflags_cc': ['-Wall', '-Wextra', '-Werror', '-Wno-missing-field-initializers'],
      'conditions': [
        ['OS!="linux"', {'type': 'none'}],
      ],
    },
  ],
}
