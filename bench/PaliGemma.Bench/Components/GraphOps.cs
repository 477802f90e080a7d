using PaliGemma.Bench.Onnx;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Bench.Components;

/// <summary>Short helpers that add one ONNX node (or a few) and return the output's name, for exporting whole components.</summary>
internal sealed class GraphOps(OnnxModelBuilder model)
{
    private int _next;

    public OnnxModelBuilder Model => model;

    public string Fresh(string hint) => $"{hint}_{_next++}";

    public string Op(string op, string[] inputs, params OnnxAttribute[] attributes)
    {
        string output = Fresh(op.ToLowerInvariant());
        model.Node(op, inputs, [output], attributes);
        return output;
    }

    /// <summary>A checkpoint tensor as an fp32 initializer (bf16/f16 widened exactly: what ORT would run).</summary>
    public string Weight(TensorData tensor, Func<float, float>? map = null)
    {
        float[] values = tensor.ToFloatArray();
        if (map is not null)
            for (int i = 0; i < values.Length; i++)
                values[i] = map(values[i]);
        string name = Fresh("w");
        model.Initializer(name, values, tensor.Shape);
        return name;
    }

    public string Constant(float value)
    {
        string name = Fresh("c");
        model.Initializer(name, [value]);
        return name;
    }

    public string Shape(params long[] values)
    {
        string name = Fresh("shape");
        model.Int64Initializer(name, values);
        return name;
    }

    /// <summary>x W^T (+ b) for a checkpoint weight [out, in]: one Gemm with transB, as exporters emit for 2-D inputs.</summary>
    public string Linear(string x, TensorData weight, TensorData? bias = null) =>
        bias is null
            ? Op("Gemm", [x, Weight(weight)], OnnxAttribute.Of("transB", 1L))
            : Op("Gemm", [x, Weight(weight), Weight(bias.Value)], OnnxAttribute.Of("transB", 1L));

    public string Reshape(string x, params long[] shape) => Op("Reshape", [x, Shape(shape)]);

    public string Transpose(string x, params long[] perm) => Op("Transpose", [x], OnnxAttribute.Of("perm", perm));

    public string Add(string a, string b) => Op("Add", [a, b]);

    public string Mul(string a, string b) => Op("Mul", [a, b]);

    /// <summary>softmax(q k^T * scale) v over the last two axes; kT is given already transposed.</summary>
    public string Attention(string q, string kT, string v, float scale)
    {
        string scores = Mul(Op("MatMul", [q, kT]), Constant(scale));
        return Op("MatMul", [Op("Softmax", [scores], OnnxAttribute.Of("axis", -1L)), v]);
    }

    public string GeluTanh(string x) => Op("Gelu", [x], OnnxAttribute.Of("approximate", "tanh"));
}
