// Every CPU kernel exists for float (training) and double (gradient checks).
#pragma once
#define PRISM_INSTANTIATE(fn) template decltype(fn<float>) fn<float>; template decltype(fn<double>) fn<double>;
