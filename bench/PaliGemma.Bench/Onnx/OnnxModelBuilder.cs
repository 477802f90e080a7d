namespace PaliGemma.Bench.Onnx;

/// <summary>An ONNX node attribute: a float, an int or a list of ints.</summary>
internal readonly record struct OnnxAttribute(string Name, float? Float = null, long? Int = null, long[]? Ints = null, string? Text = null)
{
    public static OnnxAttribute Of(string name, string value) => new(name, Text: value);
    public static OnnxAttribute Of(string name, float value) => new(name, Float: value);
    public static OnnxAttribute Of(string name, long value) => new(name, Int: value);
    public static OnnxAttribute Of(string name, params long[] values) => new(name, Ints: values);
}

/// <summary>
/// Builds a single-graph ONNX model (fp32 tensors only) and writes it with <see cref="ProtoWriter"/>. Field numbers are
/// those of onnx/onnx.proto. Initializers larger than <see cref="ExternalThreshold"/> bytes go to a side file as ONNX
/// external data, so multi-gigabyte weights (the LM head) never pass through one protobuf buffer.
/// </summary>
internal sealed unsafe class OnnxModelBuilder
{
    private const int ElemFloat = 1, ElemInt64 = 7;   // TensorProto.DataType
    private const int AttrFloat = 1, AttrInt = 2, AttrString = 3, AttrInts = 7;

    private readonly List<(string Op, string[] Inputs, string[] Outputs, OnnxAttribute[] Attributes, string Domain)> _nodes = [];
    // Data: a native float pointer (Pointer != 0), or a float[] or long[] array.
    private readonly List<(string Name, long[] Dims, nint Pointer, long Count, Array? Array)> _initializers = [];
    private readonly List<(string Name, long[] Dims)> _inputs = [];
    private readonly List<(string Name, long[] Dims)> _outputs = [];

    public int Opset { get; init; } = 17;

    /// <summary>Initializers above this many bytes are written as external data files beside the model.</summary>
    public long ExternalThreshold { get; init; } = 256L << 20;

    /// <summary>A graph input; a negative dim -i is a free size named "dim{i}" (the same name means the same size).</summary>
    public void Input(string name, params long[] dims) => _inputs.Add((name, dims));

    public void Output(string name, params long[] dims) => _outputs.Add((name, dims));

    /// <summary>An fp32 constant; the memory is read when <see cref="Save"/> runs and must stay valid until then.</summary>
    public void Initializer(string name, float* data, long count, params long[] dims)
    {
        CheckCount(name, dims, count);
        _initializers.Add((name, dims, (nint)data, count, null));
    }

    /// <summary>An fp32 constant held in a managed array.</summary>
    public void Initializer(string name, float[] data, params long[] dims)
    {
        CheckCount(name, dims, data.Length);
        _initializers.Add((name, dims, 0, data.Length, data));
    }

    /// <summary>An int64 constant (Reshape shapes, Slice bounds).</summary>
    public void Int64Initializer(string name, params long[] values) =>
        _initializers.Add((name, [values.Length], 0, values.Length, values));

    private static void CheckCount(string name, long[] dims, long count)
    {
        long product = 1;
        foreach (long d in dims)
            product *= d;
        if (product != count)
            throw new ArgumentException($"initializer '{name}': dims [{string.Join(", ", dims)}] hold {product} values, the data {count}", nameof(dims));
    }

    public void Node(string op, string[] inputs, string[] outputs, params OnnxAttribute[] attributes) =>
        _nodes.Add((op, inputs, outputs, attributes, ""));

    /// <summary>Writes <c>model.onnx</c> (and any external data files) into <paramref name="directory"/>; returns the model path.</summary>
    public string Save(string directory)
    {
        Directory.CreateDirectory(directory);
        var model = new ProtoWriter();
        model.Int64(1, Opset >= 19 ? 9 : 8);               // ir_version: 8 goes with opsets up to 18, 9 with 19-20
        model.String(2, "PaliGemma.Bench");                // producer_name
        model.Message(8, o => { o.String(1, ""); o.Int64(2, Opset); });   // opset_import, default domain
        model.Message(7, g => WriteGraph(g, directory));   // graph
        string path = Path.Combine(directory, "model.onnx");
        using (var file = File.Create(path))
            model.WriteTo(file);
        return path;
    }

    private void WriteGraph(ProtoWriter graph, string directory)
    {
        int n = 0;
        foreach (var node in _nodes)
        {
            graph.Message(1, w =>
            {
                foreach (string input in node.Inputs) w.String(1, input);
                foreach (string output in node.Outputs) w.String(2, output);
                w.String(3, $"{node.Op}_{n++}");
                w.String(4, node.Op);
                foreach (var attribute in node.Attributes) w.Message(5, a => WriteAttribute(a, attribute));
                if (node.Domain.Length > 0) w.String(7, node.Domain);
            });
        }
        graph.String(2, "bench");
        foreach (var init in _initializers)
            graph.Message(5, t => WriteTensor(t, init, directory));
        foreach (var (name, dims) in _inputs)
            graph.Message(11, v => WriteValueInfo(v, name, dims));
        foreach (var (name, dims) in _outputs)
            graph.Message(12, v => WriteValueInfo(v, name, dims));
    }

    private static void WriteAttribute(ProtoWriter w, OnnxAttribute attribute)
    {
        w.String(1, attribute.Name);
        if (attribute.Float is float f)
        {
            w.Float(2, f);
            w.Int64(20, AttrFloat);
        }
        else if (attribute.Int is long i)
        {
            w.Int64(3, i);
            w.Int64(20, AttrInt);
        }
        else if (attribute.Text is string text)
        {
            w.String(4, text);
            w.Int64(20, AttrString);
        }
        else if (attribute.Ints is long[] ints)
        {
            foreach (long v in ints) w.Int64(8, v);
            w.Int64(20, AttrInts);
        }
        else
            throw new ArgumentException($"attribute '{attribute.Name}' has no value", nameof(attribute));
    }

    private void WriteTensor(ProtoWriter t, (string Name, long[] Dims, nint Pointer, long Count, Array? Array) init, string directory)
    {
        foreach (long d in init.Dims) t.Int64(1, d);
        t.Int64(2, init.Array is long[] ? ElemInt64 : ElemFloat);
        t.String(8, init.Name);
        long bytes = init.Count * (init.Array is long[] ? sizeof(long) : sizeof(float));
        fixed (byte* pinned = init.Array is null ? default : System.Runtime.InteropServices.MemoryMarshal.AsBytes(AsSpan(init.Array)))
        {
            byte* data = init.Array is null ? (byte*)init.Pointer : pinned;
            if (bytes <= ExternalThreshold)
            {
                t.Bytes(9, new ReadOnlySpan<byte>(data, checked((int)bytes)));   // raw_data, little-endian
                return;
            }
            WriteExternal(t, init.Name, data, bytes, directory);
        }
    }

    private static ReadOnlySpan<float> AsSpan(Array array) => array switch
    {
        float[] f => f,
        long[] l => System.Runtime.InteropServices.MemoryMarshal.Cast<long, float>(l),
        _ => throw new ArgumentException($"unsupported initializer array {array.GetType()}", nameof(array)),
    };

    private static void WriteExternal(ProtoWriter t, string name, byte* data, long bytes, string directory)
    {
        string fileName = name.Replace('/', '_') + ".bin";
        using (var file = File.Create(Path.Combine(directory, fileName)))
        {
            const int Chunk = 64 << 20;
            for (long offset = 0; offset < bytes; offset += Chunk)
                file.Write(new ReadOnlySpan<byte>(data + offset, (int)Math.Min(Chunk, bytes - offset)));
        }
        t.Message(13, e => { e.String(1, "location"); e.String(2, fileName); });   // external_data
        t.Message(13, e => { e.String(1, "offset"); e.String(2, "0"); });
        t.Message(13, e => { e.String(1, "length"); e.String(2, bytes.ToString(System.Globalization.CultureInfo.InvariantCulture)); });
        t.Int64(14, 1);                                                            // data_location = EXTERNAL
    }

    private static void WriteValueInfo(ProtoWriter v, string name, long[] dims)
    {
        v.String(1, name);
        v.Message(2, type => type.Message(1, tensor =>                 // TypeProto.tensor_type
        {
            tensor.Int64(1, ElemFloat);                                // elem_type
            tensor.Message(2, shape =>                                 // TensorShapeProto
            {
                foreach (long d in dims)
                    shape.Message(1, dim =>
                    {
                        if (d >= 0) dim.Int64(1, d);                   // Dimension.dim_value
                        else dim.String(2, $"dim{-d}");                // dim_param: a negative dim is a named free size
                    });
            });
        }));
    }
}
