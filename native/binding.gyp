{
  'targets': [
    {
      'target_name': 'sockpool_native',
      'sources': ['sockpool_native.cc'],
      # node-addon-api with C++ exceptions (defines NAPI_CPP_EXCEPTIONS, drops -fno-exceptions). The path is
      # relative: node-addon-api is a direct dependency of the root package, and resolving it by path avoids
      # running whichever `node` happens to be first on PATH (the machine's Node 20).
      'dependencies': ['../node_modules/node-addon-api/node_addon_api.gyp:node_addon_api_except'],
      'defines': ['NAPI_VERSION=9', 'NODE_ADDON_API_DISABLE_DEPRECATED'],
      'cflags_cc': ['-Wall', '-Wextra', '-Werror', '-Wno-missing-field-initializers'],
      'conditions': [
        ['OS!="linux"', {'type': 'none'}],
      ],
    },
  ],
}
